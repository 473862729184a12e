"""Imports from a URL: the checks of POST /images with a JSON body, and the background work
that fetches the file and stores it under every limit and check of an upload.

start_import answers the POST: it checks the body, then writes the row (no file yet) and
queues the fetch in one transaction. run_import is the fetch: the file is streamed into
staging as an upload's body is (size limit, the header vetted from its first 64 KiB,
sha256 on the way), inspected by qemu-img, then stored and recorded on the row; a failure
records why instead. recover_imports, at start-up, fails an import that nothing will ever
finish. The calls into jobs.py and webhooks.py are one each, in queue_fetch, job_handler's
caller and announce (marked MERGE). docs/imports.md tells the whole story.
"""

import json
import logging
from functools import partial

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
from models import Image, utcnow, write_transaction
from qcow2 import HEADER_READ_SIZE, ImageRefused, check_header_start, inspect_qcow2
from queries import find_image
from storage import StorageUnavailable
from uploads import receive_body

JOB_KIND = "import"
INTERRUPTED = "interrupted"
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
    if not isinstance(body, dict):
        raise ApiError(400, f"JSON body must be an object: {BODY_FIELDS}")
    return body


def _text_field(body, field, label):
    """body[field] as a string, None when absent or null; any other type is the 400."""
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise ValidationError(field, f"{label} must be a string")
    return value


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


def start_import(user, body, config, base_url=None):
    """Answer POST /images with a JSON body (raw bytes): check it, then write the row and
    queue the fetch in one transaction; return the image, its file columns still NULL."""
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
    return find_image(image.id)


def check_downloaded(image):
    """The 409 for an image without a file: its import has not finished, or failed."""
    if image.storage_key is not None:
        return
    if image.download_error is not None:
        raise ApiError(409, f"Image download failed: {image.download_error}")
    raise ApiError(409, NOT_DOWNLOADED)


# --- where jobs.py and webhooks.py come in -----------------------------------------------

def job_payload(image_id, credentials, base_url):
    """What the job carries: the password lives here only (never on the row), until the
    job is done."""
    return {"image_id": image_id, "credentials": list(credentials) if credentials else None,
            "base_url": base_url}


def queue_fetch(image_id, credentials, base_url):
    """Queue run_import for the image, inside the caller's transaction.

    MERGE: jobs.enqueue(JOB_KIND, job_payload(image_id, credentials, base_url)).
    Until then nothing runs the fetch in the service; tests call run_import.
    """
    return job_payload(image_id, credentials, base_url)


def job_handler(storage, config):
    """The handler of JOB_KIND jobs: run_import with what the payload carries.

    MERGE: jobs.register(JOB_KIND, job_handler(storage, config), ...) in create_app.
    """

    def handle(payload):
        credentials = payload.get("credentials")
        run_import(payload["image_id"], storage, config,
                   tuple(credentials) if credentials else None, payload.get("base_url"))

    return handle


def queued_import_ids():
    """Ids of the images whose import job will still run (recover_imports keeps those).

    MERGE: the "image_id" of every JOB_KIND job not yet done (a leased one included: the
    lease takeover restarts it). Until jobs.py exists, no job runs, so none is queued.
    """
    return set()


def announce(image_id, base_url):
    """Tell the namespace's webhooks that the import finished (well or not); called inside
    the transaction that records the end, so the event is written with it.

    MERGE: webhooks.emit("downloaded", find_image(image_id), base_url).
    """
    return image_id


# --- the fetch ---------------------------------------------------------------------------

def run_import(image_id, storage, config, credentials=None, base_url=None):
    """Fetch the image and store it under an upload's rules, or record why that failed.

    An import that is finished already, or deleted, is left alone: a job run again after
    a takeover does no harm.
    """
    source = _mark_started(image_id)
    if source is None:
        return
    try:
        _fetch_and_store(image_id, source, storage, config, credentials, base_url)
    except ImportGone:
        log.info("import %s was deleted or finished meanwhile; its file removed", image_id)
    except (FetchError, ImageRefused) as failure:
        fail_import(image_id, str(failure), base_url)
    except ApiError as failure:  # receive_body's refusals of the body
        fail_import(image_id, _body_failure(failure, config["MAX_IMAGE_SIZE"]), base_url)
    except StorageUnavailable as error:
        fail_import(image_id, storage_unavailable_message(error), base_url)
    except Exception:  # logged with its traceback; the client is told no internals
        log.exception("import %s failed", image_id)
        fail_import(image_id, "internal error", base_url)


def _mark_started(image_id):
    """Set the import's started_at; its source, or None when it is finished or gone."""
    with write_transaction():
        image = Image.get_or_none(Image.id == image_id)
        if image is None or image.download_source is None or image.download_finished_at:
            return None
        Image.update(download_started_at=utcnow()).where(Image.id == image_id).execute()
    return image.download_source


def _fetch_and_store(image_id, source, storage, config, credentials, base_url):
    """Stream the file into staging, inspect it, then store and record it."""
    with storage.staging() as staged:
        size, sha256 = _download(source, credentials, staged, storage, config)
        info = inspect_qcow2(staged.path, config["MAX_VIRTUAL_SIZE"], config["QEMU_IMG_SLOTS"])
        store_file(storage, staged, partial(_record_file, image_id, size, sha256, info,
                                            base_url))


def _download(source, credentials, staged, storage, config):
    """The answer's body into the staged file, as an upload's body: (size, sha256)."""
    max_size, max_virtual = config["MAX_IMAGE_SIZE"], config["MAX_VIRTUAL_SIZE"]
    with open_url(source, credentials, guard(config), limits(config)) as download:
        length = download.length
        if length is not None and length > max_size:
            raise FetchError(f"too large: the Content-Length of {length} bytes is past the "
                             f"limit of {max_size} bytes")
        check_room_for_upload(storage, config["MIN_FREE_SPACE"], length)
        check_start = partial(check_header_start, file_size=length, max_virtual_size=max_virtual)
        return receive_body(download, staged.file, max_size, length, None, check_start,
                            HEADER_READ_SIZE)


def _body_failure(error, max_size):
    """download.error for an upload's refusal of the body (receive_body's ApiError)."""
    if error.status == 413:
        return f"too large: the body ran past the limit of {max_size} bytes"
    if error.status == 400:
        return CUT_OFF
    return error.message  # 507: the store's disk is full


def _record_file(image_id, size, sha256, info, base_url, key):
    """Give the row its stored file and finished_at (one transaction), and announce it."""
    with write_transaction():
        updated = Image.update(
            storage_key=key, size=size, virtual_size=info.virtual_size, sha256=sha256,
            download_finished_at=utcnow(), download_error=None,
        ).where(Image.id == image_id, Image.download_finished_at.is_null()).execute()
        if not updated:
            raise ImportGone(image_id)
        announce(image_id, base_url)
    log.info("import %s stored: %s bytes, sha256 %s", image_id, size, sha256)


def fail_import(image_id, error, base_url=None):
    """Record why the import failed, and announce it; nothing for one already finished."""
    with write_transaction():
        updated = Image.update(download_error=error, download_finished_at=utcnow()).where(
            Image.id == image_id, Image.download_source.is_null(False),
            Image.download_finished_at.is_null()).execute()
        if updated:
            announce(image_id, base_url)
    if updated:
        log.warning("import %s failed: %s", image_id, error)
    return bool(updated)


def recover_imports(queued_ids=queued_import_ids):
    """At start-up: fail, with error "interrupted", every unfinished import that no job
    will run any more (its process was killed, and it had no job left); return how many.

    The unfinished ones are read before the queued ones: a row and its job are written in
    one transaction, so an import seen unfinished whose job is not seen has lost it.
    """
    unfinished = {image_id for (image_id,) in Image.select(Image.id).where(
        Image.download_source.is_null(False), Image.download_finished_at.is_null()).tuples()}
    lost = unfinished - set(queued_ids())
    return sum(fail_import(image_id, INTERRUPTED) for image_id in sorted(lost))
