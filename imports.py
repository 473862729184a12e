"""Imports from a URL: the checks of POST /images with a JSON body, and the background work
that fetches the file and stores it under every limit and check of an upload.

start_import answers the POST: it checks the body, then writes the row (no file yet) and
queues the fetch in one transaction. run_import is the fetch: the file is streamed into
staging as an upload's body is (size limit, the header vetted from its first 64 KiB,
sha256 on the way), inspected by qemu-img, then stored and recorded on the row; a failure
records why instead. recover_imports, at start-up, fails an import that nothing will ever
finish. The fetch is a jobs.py job (register_job, queue_fetch), the end of each import is
a `downloaded` webhook event (announce), a count in /metrics and an audit line.
docs/imports.md tells the whole story.
"""

import json
import logging
import threading
import time
from functools import partial

import audit
import image_stats
import jobs
import metrics
import webhooks
from diskspace import check_room_for_upload
from errors import ApiError, ValidationError, storage_unavailable_message
from fetch import (
    CUT_OFF,
    FetchError,
    Guard,
    Limits,
    UrlRefused,
    check_literal,
    open_url,
    parse_url,
    url_credentials,
    without_password,
)
from image_changes import plan_upload, record_image, store_file
from models import Image, Job, utcnow, write_transaction
from qcow2 import HEADER_READ_SIZE, ImageRefused, check_header_start, inspect_qcow2
from queries import find_image
from quotas import QuotaExceeded, check_quota_at_record, check_quotas, quotas_of
from storage import StorageUnavailable
from uploads import receive_body

JOB_KIND = "import"
INTERRUPTED = "interrupted"
INTERNAL_ERROR = "internal error"
# The slowest average rate a transfer may keep: a file of MAX_IMAGE_SIZE (20 GiB) gets 5.7 h
# at it, and none less than an hour. Past it the import fails: the job's own timeout (the
# transfer's, plus JOB_MARGIN for qemu-img and storing) must not end with a second fetch
# of it started by a takeover while the first still runs.
MIN_RATE = 1 << 20  # bytes a second
MIN_TRANSFER_SECONDS = 3600
JOB_MARGIN = 3600  # seconds: waiting for a qemu-img slot, its runs, moving the file in
WATCH_SECONDS = 0.5  # how soon a stop or the end of a transfer's time cuts it
JOB_BACKOFF = (60, 300)  # a try fails only when the database does: wait, then again
NOT_DOWNLOADED = "Image not downloaded yet"
MAX_BODY = 64 * 1024  # a JSON body of three short strings; more is not an import
BODY_FIELDS = '{"name", "namespace", "download_url"}'
log = logging.getLogger(__name__)


class ImportGone(Exception):
    """The import's row was deleted (or finished by another run) while it was fetched."""


def guard(config):
    """The address guard of the configuration."""
    return Guard(config["DOWNLOAD_ALLOW_PRIVATE"], config["DOWNLOAD_ALLOW_HOSTS"])


def limits(config):
    """The fetch's timeouts of the configuration."""
    return Limits(config["DOWNLOAD_CONNECT_TIMEOUT"], config["DOWNLOAD_STALL_TIMEOUT"])


# --- the POST ----------------------------------------------------------------------------

def read_body(raw):
    """The JSON object of a POST /images body; 413 past MAX_BODY, 400 when it is no object."""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"JSON body larger than {MAX_BODY} bytes: send {BODY_FIELDS}")
    try:
        body = json.loads(raw)
    except ValueError as error:  # also bytes that are not UTF-8
        raise ApiError(400, f"Body is not valid JSON: {error}") from None
    except RecursionError:  # 64 KiB of "[" is a hostile body, not a server error
        raise ApiError(400, "Body is not valid JSON: arrays or objects nested too deeply"
                       ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"JSON body must be an object: {BODY_FIELDS}")
    return body


def requested_fields(raw):
    """name, namespace and download_url of a POST /images body (raw bytes) as sent, each
    None where the body holds no such text: for the audit line of a refused import."""
    try:
        body = read_body(raw)
    except ApiError:
        return None, None, None
    return tuple(_text_or_none(body, field) for field in ("name", "namespace", "download_url"))


def _text_or_none(body, field):
    """body[field] where _text_field takes it, else None."""
    try:
        return _text_field(body, field, field)
    except ValidationError:
        return None


def _text_field(body, field, label):
    """body[field] as a string, None when absent or null; any other type is the 400, and
    so is a string with a lone surrogate (JSON's "\\ud800"), which is no text: UTF-8, the
    database and the logs cannot hold it."""
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise ValidationError(field, f"{label} must be a string")
    if value is not None and not _is_text(value):
        raise ValidationError(field, f"{label} must not hold a lone surrogate (\\ud800-\\udfff)")
    return value


def _is_text(value):
    """Whether value can be written as UTF-8."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_download_url(url, address_guard):
    """Check download_url's form, and its host when that is an IP literal; return the
    credentials (user, password) it carries, or None. A refusal is the 400 of the field."""
    if not url:
        raise ValidationError("download_url", "Download URL field required")
    try:
        check_literal(parse_url(url), address_guard)
    except UrlRefused as refused:
        raise ValidationError("download_url", f"Download URL {refused}") from None
    except FetchError as refused:  # the address guard
        raise ValidationError("download_url", f"Download URL refused: {refused}") from None
    return url_credentials(url)


def start_import(user, body, config, base_url=None, actor=None):
    """Answer POST /images with a JSON body (raw bytes): check it, then write the row and
    queue the fetch in one transaction, and write the audit line (actor: auth.who()'s
    fields of the request); return the image, its file columns still NULL."""
    body = read_body(body)
    name, namespace = _text_field(body, "name", "Name"), _text_field(body, "namespace", "Namespace")
    url = _text_field(body, "download_url", "Download URL")
    plan = plan_upload(user, name, namespace)
    credentials = check_download_url(url, guard(config))
    columns = {"download_source": without_password(url), "download_created_at": utcnow()}
    image = record_image(plan, columns,
                         then=lambda image: queue_fetch(image.id, credentials, base_url),
                         base_url=base_url)
    log.info("import %s queued from %s", image.id, without_password(url, keep_user=False))
    image = find_image(image.id)
    audit.record("import", image=image, status=201, source=image.download_source,
                 **(actor or {"user": user}))
    return image


def check_downloaded(image):
    """The 409 for an image without a file: its import has not finished, or failed."""
    if image.storage_key is not None:
        return
    if image.download_error is not None:
        raise ApiError(409, f"Image download failed: {image.download_error}")
    raise ApiError(409, NOT_DOWNLOADED)


# --- where jobs.py and webhooks.py come in -----------------------------------------------

def transfer_seconds(config):
    """How long a transfer may take in all: MAX_IMAGE_SIZE at MIN_RATE, an hour at least."""
    return max(MIN_TRANSFER_SECONDS, config["MAX_IMAGE_SIZE"] / MIN_RATE)


def register_job(storage, config):
    """Register the fetch with jobs.py (create_app): run_import for each JOB_KIND job; a
    job that jobs.py gives up on fails its import; a failed job keeps no password."""
    jobs.register(JOB_KIND, job_handler(storage, config), backoff=JOB_BACKOFF,
                  max_attempts=len(JOB_BACKOFF) + 1,
                  timeout=transfer_seconds(config) + JOB_MARGIN, on_failure=job_failed,
                  failed_payload=lambda payload: {**payload, "credentials": None})


def job_payload(image_id, credentials, base_url):
    """What the job carries: the password lives here only (never on the row), until the
    job is done (deleted) or failed (then register_job's failed_payload drops it)."""
    return {"image_id": image_id, "credentials": list(credentials) if credentials else None,
            "base_url": base_url}


def queue_fetch(image_id, credentials, base_url):
    """Queue run_import for the image, inside the caller's transaction; the job's id."""
    return jobs.enqueue(JOB_KIND, job_payload(image_id, credentials, base_url))


def job_handler(storage, config):
    """The handler of JOB_KIND jobs: run_import with what the payload carries."""

    def handle(payload):
        credentials = payload.get("credentials")
        run_import(payload["image_id"], storage, config,
                   tuple(credentials) if credentials else None, payload.get("base_url"))

    return handle


def job_failed(payload, error):
    """jobs.py gave up on an import's job: fail the import, "interrupted" when the last
    try's worker died, else "internal error" (the job's own error is for `job list`)."""
    reason = INTERRUPTED if error.endswith(jobs.WORKER_STOPPED) else INTERNAL_ERROR
    fail_import(payload["image_id"], reason, payload.get("base_url"))


def queued_import_ids():
    """Ids of the images whose import job will still run (recover_imports keeps those):
    every pending JOB_KIND job, a claimed one included (if its worker died, a takeover
    runs it again). A failed job runs no more."""
    payloads = Job.select(Job.payload).where(Job.kind == JOB_KIND, Job.state == jobs.PENDING)
    return {json.loads(payload)["image_id"] for (payload,) in payloads.tuples()}


def announce(image, base_url):
    """Tell the namespace's webhooks that the import finished (well or not); called inside
    the transaction that records the end, so the event is written with it. Without a base
    URL (a start-up that found it cut off, and no PUBLIC_URL) no event can be made."""
    if base_url is None:
        log.warning("import %s ended without a base URL: no webhook event", image.id)
        return
    webhooks.emit("downloaded", image, base_url)


# --- the fetch ---------------------------------------------------------------------------

def run_import(image_id, storage, config, credentials=None, base_url=None):
    """Fetch the image and store it under an upload's rules, or record why that failed.

    An import that is finished already, or deleted, is left alone: a job run again after
    a takeover does no harm. One cut short because this process stops raises
    jobs.Interrupted: its job is handed back, and runs again elsewhere.
    """
    image = _mark_started(image_id)
    if image is None:
        return
    try:
        _fetch_and_store(image, storage, config, credentials, base_url)
    except jobs.Interrupted:
        log.info("import %s handed back to run again: this process stops", image_id)
        raise
    except ImportGone:
        log.info("import %s was deleted or finished meanwhile; its file removed", image_id)
    except ImageRefused as refusal:
        fail_import(image_id, str(refusal), base_url, outcome=refusal.rule)
    except FetchError as failure:
        fail_import(image_id, str(failure), base_url)
    except QuotaExceeded as refusal:
        fail_import(image_id, refusal.message, base_url)
    except ApiError as failure:  # receive_body's refusals of the body
        fail_import(image_id, _body_failure(failure, config["MAX_IMAGE_SIZE"]), base_url)
    except StorageUnavailable as error:
        fail_import(image_id, storage_unavailable_message(error), base_url)
    except Exception:  # logged with its traceback; the client is told no internals
        log.exception("import %s failed", image_id)
        fail_import(image_id, INTERNAL_ERROR, base_url)


def _mark_started(image_id):
    """Set the import's started_at; the image (with its relations), or None when it is
    finished or gone."""
    with write_transaction():
        image = find_image(image_id)
        if image is None or image.download_source is None or image.download_finished_at:
            return None
        Image.update(download_started_at=utcnow()).where(Image.id == image_id).execute()
    return image


def _fetch_and_store(image, storage, config, credentials, base_url):
    """Stream the file into staging, inspect it, then store and record it."""
    with storage.staging() as staged:
        size, sha256 = _download(image, credentials, staged, storage, config)
        info = inspect_qcow2(staged.path, config["MAX_VIRTUAL_SIZE"], config["QEMU_IMG_SLOTS"])
        store_file(storage, staged, partial(_record_file, image.id, size, sha256, info,
                                            base_url))


def _download(image, credentials, staged, storage, config):
    """The answer's body into the staged file, as an upload's body: (size, sha256). A
    Content-Length is checked first against the size limit, then against the quotas."""
    max_size = config["MAX_IMAGE_SIZE"]
    with open_url(image.download_source, credentials, guard(config), limits(config)) as download:
        length = download.length
        if length is not None and length > max_size:
            raise FetchError(f"too large: the Content-Length of {length} bytes is past the "
                             f"limit of {max_size} bytes")
        if length is not None:  # the row counts as one image already: not itself again
            root_id = image.namespace.root_id if image.namespace is not None else None
            check_quotas(quotas_of(image.user_id, root_id), length, except_image=image.id)
        check_room_for_upload(storage, config["MIN_FREE_SPACE"], length)
        return _receive(download, staged, length, config)


class _Watchdog(threading.Thread):
    """Ends a download's transfer from the side, as its reads may block for a long time
    on a server that trickles: when this process's job threads stop (then the import
    raises jobs.Interrupted and its job is handed back), or when the transfer has taken
    transfer_seconds. It looks every WATCH_SECONDS; check() raises why it cut."""

    def __init__(self, download, seconds):
        super().__init__(name="import-watchdog", daemon=True)
        self.download, self.seconds = download, seconds
        self.deadline = time.monotonic() + seconds
        self.done, self.reason = threading.Event(), None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()

    def run(self):
        while not self.done.wait(WATCH_SECONDS):
            if jobs.stopping():
                self.reason = "stopping"
            elif time.monotonic() > self.deadline:
                self.reason = "timeout"
            else:
                continue
            self.download.abort()
            return

    def check(self):
        """Raise what the cut means, if the watchdog cut the transfer."""
        if self.reason == "stopping":
            raise jobs.Interrupted()
        if self.reason == "timeout":
            raise FetchError(f"timed out: the transfer took more than {self.seconds:g} s")


def _receive(download, staged, length, config):
    """receive_body of the download's body, under a _Watchdog: a read that it cut ends
    with its reason, not with what the cut read made of it (a cut-off, or a short body
    taken for the whole one where no Content-Length was sent)."""
    check_start = partial(check_header_start, file_size=length,
                          max_virtual_size=config["MAX_VIRTUAL_SIZE"])
    with _Watchdog(download, transfer_seconds(config)) as watchdog:
        try:
            received = receive_body(download, staged.file, config["MAX_IMAGE_SIZE"], length,
                                    None, check_start, HEADER_READ_SIZE)
        except Exception:
            watchdog.check()
            raise
        watchdog.check()
    return received


def _body_failure(error, max_size):
    """download.error for an upload's refusal of the body (receive_body's ApiError)."""
    if error.status == 413:
        return f"too large: the body ran past the limit of {max_size} bytes"
    if error.status == 400:
        return CUT_OFF
    return error.message  # 507: the store's disk is full


def _record_file(image_id, size, sha256, info, base_url, key):
    """Give the row its stored file and finished_at, in one transaction with the quota
    check (the quotas' rows locked, as for an upload), the `downloaded` event and the
    stored images' totals; a refused quota raises, and store_file removes the file."""
    with write_transaction():
        image = find_image(image_id)
        if image is None or image.download_finished_at is not None:
            raise ImportGone(image_id)
        check_quota_at_record(image.user, image.namespace, size, except_image=image_id)
        updated = Image.update(
            storage_key=key, size=size, virtual_size=info.virtual_size, sha256=sha256,
            download_finished_at=utcnow(), download_error=None,
        ).where(Image.id == image_id, Image.download_finished_at.is_null()).execute()
        if not updated:
            raise ImportGone(image_id)
        image = find_image(image_id)
        announce(image, base_url)
        image_stats.change(1, size)  # last: it holds the totals' row until the commit
    log.info("import %s stored: %s bytes, sha256 %s", image_id, size, sha256)
    _ended(image, "stored")


def fail_import(image_id, error, base_url=None, outcome=None):
    """Record why the import failed, and announce it; nothing for one already finished.
    outcome: its name in /metrics and the audit log, by default failure_outcome(error)."""
    with write_transaction():
        updated = Image.update(download_error=error, download_finished_at=utcnow()).where(
            Image.id == image_id, Image.download_source.is_null(False),
            Image.download_finished_at.is_null()).execute()
        image = find_image(image_id) if updated else None
        if image is not None:
            announce(image, base_url)
    if image is not None:
        log.warning("import %s failed: %s", image_id, error)
        _ended(image, outcome or failure_outcome(error), error)
    return bool(updated)


# The beginning of a download.error, and the short name /metrics counts it by (and the
# audit log writes as outcome); a refusal of the file itself is counted by its rule.
FAILURE_OUTCOMES = (
    ("HTTP ", "http_error"),
    ("too large", "too_large"),
    ("timed out", "timeout"),
    ("address not allowed", "refused_address"),
    ("redirect refused", "refused_redirect"),
    ("too many redirects", "too_many_redirects"),
    ("could not resolve", "dns_error"),
    ("TLS", "tls_error"),
    ("could not connect", "connection_error"),
    ("connection to", "connection_error"),
    (CUT_OFF, "cut_off"),
    ("Quota exceeded", "quota"),
    ("Image store unavailable", "store_unavailable"),
    ("Insufficient Storage", "disk_full"),
    (INTERRUPTED, "interrupted"),
)


def failure_outcome(error):
    """The short name of a failed import's download.error (FAILURE_OUTCOMES), "error"
    for anything else (a server that did not answer in HTTP is a connection_error)."""
    if " did not answer in HTTP" in error:
        return "connection_error"
    return next((name for start, name in FAILURE_OUTCOMES if error.startswith(start)), "error")


def _ended(image, outcome, error=None):
    """Count the end of an import in /metrics and write its audit line (by its author)."""
    metrics.count_import(outcome)
    audit.record("import", user=image.author, image=image, outcome=outcome, error=error,
                 source=image.download_source)


def recover_imports(queued_ids=queued_import_ids, base_url=None):
    """At start-up: fail, with error "interrupted", every unfinished import that no job
    will run any more (its process was killed, and it had no job left); return how many.
    base_url (PUBLIC_URL) is that of their `downloaded` events; without it none is sent.

    The unfinished ones are read before the queued ones: a row and its job are written in
    one transaction, so an import seen unfinished whose job is not seen has lost it.
    """
    unfinished = {image_id for (image_id,) in Image.select(Image.id).where(
        Image.download_source.is_null(False), Image.download_finished_at.is_null()).tuples()}
    lost = unfinished - set(queued_ids())
    return sum(fail_import(image_id, INTERRUPTED, base_url) for image_id in sorted(lost))
