"""Resumable uploads (tus 1.0.0, API.md "Resumable uploads"): the rules, without Flask.

An upload is a row (models.Upload) and its bytes so far, which the store keeps
(Storage.begin_upload, upload_piece, complete_upload, abort_upload): a file on the local
store, an S3 multipart upload on S3. A piece is received as a POST /images body is
(uploads.receive_body), under the upload's lock (uploadlocks.py), and counted by one
conditional UPDATE of the row: so the offset in the row is always that of bytes that are
kept, whichever worker or instance took the piece and whatever happened to the one before.
The sha256 of the whole file goes on from piece to piece in the row (resumablehash.py);
the header is vetted as soon as its first 64 KiB are in; the last piece is inspected and
stored as POST /images does (qcow2.inspect_qcow2, image_changes.create_image).
"""

import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

import compiled
from compiled import slot
from digests import MISMATCH, parse_sha256_hex
from errors import ApiError, ValidationError, not_found
from image_changes import create_image, plan_upload
from models import Image, Upload, unsynced_write, utcnow, write_transaction
from qcow2 import HEADER_READ_SIZE, ImageRefused, check_header_start, inspect_qcow2
from quotas import QuotaExceeded, check_quota_at_record, check_quota_early, plan_namespace
from resumablehash import AVAILABLE, ResumableSha256, file_sha256
from storage import StorageUnavailable, UploadGone
from uploadlocks import UploadBusy, forget_lock, upload_lock
from uploads import BodyEndedEarly, receive_body, too_large

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "termination", "expiration", "checksum")
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_COUNT = re.compile(r"[0-9]{1,19}")  # a byte count; 19 digits is past any file
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """The settings an upload is held to (config.py)."""

    max_size: int
    max_virtual_size: int
    qemu_img_slots: tuple | None
    expiry: int  # seconds from creation


@dataclass(frozen=True)
class Body:
    """A PATCH's body: the stream, its Content-Length (None when chunked), its BodyWatch."""

    stream: object
    length: int | None
    watch: object = None


@dataclass(frozen=True)
class Progress:
    """Where an upload stands after a request: its row, and its image once done (stored:
    by this very request)."""

    upload: Upload
    image: Image | None = None
    stored: bool = False


class UploadLost(ApiError):
    """The 410 of an upload whose bytes the store lost; the upload is removed with them."""


# What a piece's request can raise after which its upload is gone, removed by the code that
# raised it: the file refused (its header, or at the end a rule, the sha256, the name), a
# quota passed at the end, the bytes lost. Any other error leaves the upload as it was.
ENDS_UPLOAD = (ValidationError, QuotaExceeded, UploadLost)


# ------------------------------------------------------------------ headers


def parse_count(text, header):
    """A byte count from a header (Upload-Length, Upload-Offset); 400 when missing or bad."""
    if text is None:
        raise ApiError(400, f"{header} required")
    if not _COUNT.fullmatch(text.strip()):
        raise ApiError(400, f"{header} must be a whole number of bytes, not {text[:40]!r}")
    return int(text)


def parse_length(text, max_size):
    """Upload-Length: required (deferred lengths are not offered), at most max_size (413)."""
    if text is None:
        raise ApiError(400, "Upload-Length required: the size of the whole file in bytes "
                            "(Upload-Defer-Length is not supported)")
    length = parse_count(text, "Upload-Length")
    if length > max_size:
        raise too_large(max_size)
    return length


def parse_metadata(text):
    """Upload-Metadata: `key base64,key base64,...` into {key: text}; 400 when malformed."""
    found = {}
    if not (text or "").strip():
        return found
    for pair in text.split(","):
        key, _, value = pair.strip().partition(" ")
        if not key or key in found or " " in value.strip():
            raise _bad_metadata(f"{pair.strip()[:40]!r} is not a new key and its base64 value")
        try:
            found[key] = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _bad_metadata(f"the value of {key[:40]!r} is not base64 of UTF-8 text") from None
    return found


def _bad_metadata(why):
    return ApiError(400, f"Upload-Metadata malformed: {why}")


def encode_metadata(metadata):
    """The Upload-Metadata header for a dict of texts (HEAD tells it back)."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in metadata.items())


def parse_checksum(text):
    """Upload-Checksum `sha1 BASE64` or `sha256 BASE64`: (algorithm, digest); None if absent.
    Another algorithm, or a digest of the wrong size, is a 400 (tus' checksum extension)."""
    if text is None:
        return None
    algorithm, _, value = text.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise ApiError(400, f"Upload-Checksum algorithm {algorithm[:20]!r} not supported: "
                            f"use {' or '.join(CHECKSUMS)}")
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise ApiError(400, f"Upload-Checksum malformed: not a base64 {algorithm} digest")
    return algorithm, digest


# ------------------------------------------------------------------ creation


def create_upload(user, length, metadata, storage, limits):
    """Check a new upload as POST /images checks one before its body, its quotas included;
    make its row and its place in the store."""
    namespace = metadata.get("namespace") or None
    plan = plan_upload(user, metadata.get("name"), namespace)
    sha256 = parse_sha256_hex(metadata["sha256"]) if "sha256" in metadata else None
    if length == 0:  # complete at once, and never a QCOW2 image: refused as an empty body is
        _refuse_empty(limits)
    check_quota_early(plan, length)  # before the write lock
    upload = _reserve(plan, namespace, length, metadata, sha256, limits)
    try:
        state = storage.begin_upload(upload.id, length)
    except BaseException:
        Upload.delete().where(Upload.id == upload.id).execute()
        raise
    upload.state = json.dumps(state)
    Upload.update(state=upload.state).where(Upload.id == upload.id).execute()
    return upload


def _reserve(plan, namespace, length, metadata, sha256, limits):
    """The upload's row, written in the transaction that checks its quotas with its length,
    their rows locked: of two uploads made at once that together pass a quota, one is
    refused. From then on it counts against them until it ends (quotas.pending_usage)."""
    tree = plan_namespace(plan)
    with write_transaction():
        check_quota_at_record(plan.owner, tree, length)
        return Upload.create(
            id=secrets.token_hex(16), user=plan.author, owner=plan.owner,
            root=tree.root_id if tree is not None else None, name=plan.name,
            namespace=namespace, length=length, metadata=json.dumps(metadata), sha256=sha256,
            hash_state=ResumableSha256().state().hex() if AVAILABLE else None,
            expires_at=utcnow() + timedelta(seconds=limits.expiry))


def _refuse_empty(limits):
    try:
        check_header_start(b"", 0, limits.max_virtual_size)
    except ImageRefused as refusal:
        raise ValidationError("file", str(refusal)) from None


# ------------------------------------------------------------------ reading, removing


def _upload_by_id():
    """The upload whose id is in slot "id"."""
    return Upload.select().where(Upload.id == slot("id"))


def read_upload(upload_id):
    """The upload row of upload_id, or None. Compiled once (compiled.py): a PATCH reads it
    three times, and peewee's compiling of each was a third of a small piece's time."""
    if not UPLOAD_ID.fullmatch(upload_id):
        return None
    found = compiled.graph(_upload_by_id, {"id": upload_id}, ("",))
    return found[0] if found else None


def find_upload(user, upload_id):
    """user's upload: 404 for one that is not there or not theirs, 410 once expired."""
    upload = read_upload(upload_id)
    if upload is None or upload.user_id != user.id:
        raise not_found()
    if upload.expires_at <= utcnow():
        raise ApiError(410, "Gone: the upload expired; start a new one")
    return upload


def discard(upload, storage):
    """Remove an upload's bytes, then its row (a crash in between leaves a row that the
    sweep removes again), then its lock's file."""
    storage.abort_upload(upload.id, json.loads(upload.state))
    Upload.delete().where(Upload.id == upload.id).execute()
    forget_lock(upload.id)


def delete_upload(user, upload_id, storage):
    """DELETE /uploads/:id: the upload and its bytes are gone (its image, if done, stays)."""
    upload = read_upload(upload_id)
    if upload is None or upload.user_id != user.id:
        raise not_found()
    discard(upload, storage)


def sweep_expired(storage):
    """Remove every upload past its expiry, and its bytes; return how many. An upload
    whose store is down is left for the next sweep."""
    removed = 0
    for upload in Upload.select().where(Upload.expires_at <= utcnow()):
        try:
            discard(upload, storage)
        except StorageUnavailable as error:
            log.warning("expired upload %s left for the next sweep: %s", upload.id, error)
            continue
        removed += 1
    return removed


# ------------------------------------------------------------------ pieces


def receive_piece(user, found, offset, checksum, body, storage, limits, base_url=None):
    """PATCH /uploads/:id of the upload found (by find_upload: 404 and 410 before any lock):
    receive the piece at offset (409 if the upload is elsewhere or another request writes
    it), keep it, and finish the upload when it is the last (base_url: that of the image's
    `url` in its `created` webhook event). ENDS_UPLOAD: the errors that end the upload."""
    upload_id = found.id
    try:
        with upload_lock(upload_id):
            upload = find_upload(user, upload_id)  # as it is now that nobody else writes
            _check_piece(upload, offset, body.length)
            if upload.offset == upload.length:  # done: a lost answer asked for again
                return Progress(upload, upload.image)
            return _write_piece(user, upload, checksum, body, storage, limits, base_url)
    except UploadBusy:
        raise ApiError(409, "Conflict: another request is sending a piece of this upload; "
                            "HEAD it for its offset and go on from there") from None
    except UploadGone as gone:
        log.warning("upload %s lost its bytes: %s", upload_id, gone)
        lost = read_upload(upload_id)
        if lost is not None:
            discard(lost, storage)
        raise UploadLost(410, "Gone: the upload's bytes were lost; start a new one") from None


def _check_piece(upload, offset, length):
    """409 for a piece that is not at the upload's offset; 413 for one past its length."""
    if offset != upload.offset:
        raise ApiError(409, f"Conflict: Upload-Offset {offset} is not the upload's offset "
                            f"{upload.offset}; HEAD it and go on from there")
    if length is not None and offset + length > upload.length:
        raise past_length(upload)


def past_length(upload):
    """The 413 for a piece with more bytes than the upload has left."""
    return ApiError(413, f"The piece runs past Upload-Length: {upload.length - upload.offset}"
                         " bytes remain")


def _write_piece(user, upload, checksum, body, storage, limits, base_url):
    """Receive a piece into the store, check its Upload-Checksum (460: not kept), record
    it; the last one finishes the upload."""
    digests = PieceDigests(upload, checksum)
    with storage.upload_piece(upload.id, json.loads(upload.state), upload.offset) as piece:
        size = _receive(upload, piece, body, digests, storage, limits)
        digests.verify()
        complete = upload.offset + size == upload.length
        state = piece.keep(size, complete)
    if complete:
        image = _finish(user, upload, state, digests, storage, limits, base_url)
        return Progress(read_upload(upload.id), image, stored=True)
    return Progress(_advance(upload, size, state, digests, storage))


def _receive(upload, piece, body, digests, storage, limits):
    """The piece's bytes into piece.file; return how many. A cut-off piece without a
    checksum keeps what came; a hostile header ends the upload."""
    check_start, start_size = _header_check(upload, limits)
    try:
        size, _ = receive_body(body.stream, piece.file, upload.length - upload.offset,
                               body.length, body.watch, check_start, start_size, digests)
    except BodyEndedEarly as ended:
        if ended.received and not digests.checksum \
                and upload.offset + ended.received < upload.length:
            _advance(upload, ended.received, piece.keep(ended.received, False), digests,
                     storage)
        raise
    except ImageRefused as refusal:
        discard(upload, storage)
        raise ValidationError("file", str(refusal)) from None
    except ApiError as error:
        if error.status == 413:  # a chunked piece past the length
            raise past_length(upload) from None
        raise
    return size


def _header_check(upload, limits):
    """(check_start, start_size) for receive_body: the header is vetted by the piece that
    brings its last bytes in (those before it are kept in the row); (None, 0) once it was,
    and for a file too short to have that much header (the end inspects it all)."""
    if upload.offset >= HEADER_READ_SIZE or upload.length < HEADER_READ_SIZE:
        return None, 0
    head = bytes(upload.head or b"")

    def check(first):
        check_header_start(head + first, upload.length, limits.max_virtual_size)

    return check, HEADER_READ_SIZE - upload.offset


def _advance_query():
    """Set the upload's offset (and what goes with it) if it is still at slot "from"."""
    return (Upload.update(offset=slot("offset"), state=slot("state"),
                          hash_state=slot("hash_state"), head=slot("head"))
            .where(Upload.id == slot("id"), Upload.offset == slot("from")))


def _advance(upload, size, state, digests, storage):
    """Record size more bytes as kept: one UPDATE that counts only if the offset is still
    the one the piece started at. The row gone meanwhile (DELETE, sweep) is a 404."""
    values = {"offset": upload.offset + size, "state": json.dumps(state),
              "hash_state": digests.saved_state(), "head": digests.head(), "id": upload.id,
              "from": upload.offset}
    with unsynced_write():  # a crash may lose it: the piece is sent again (models.py)
        updated = compiled.changed(_advance_query, values)
    if not updated:
        storage.abort_upload(upload.id, state)  # what this piece added after the DELETE
        raise not_found()
    return read_upload(upload.id)


# ------------------------------------------------------------------ the end


def _finish(user, upload, state, digests, storage, limits, base_url):
    """Check and store the whole file as POST /images does (its quotas too, now with the
    upload counted by its image alone); a refusal ends the upload."""
    try:
        with storage.complete_upload(upload.id, state) as finished:
            sha256 = digests.hexdigest() or file_sha256(finished.path)
            if upload.sha256 and sha256 != upload.sha256:
                raise ValidationError("file", f"{MISMATCH}: the upload's sha256 is {sha256}, "
                                              f"its Upload-Metadata said {upload.sha256}")
            info = inspect_qcow2(finished.path, limits.max_virtual_size, limits.qemu_img_slots)
            plan = plan_upload(user, upload.name, upload.namespace)
            return create_image(plan, storage, finished, upload.length, sha256, info,
                                base_url=base_url, put=lambda staged: staged.store(),
                                record=lambda image: _mark_done(upload, image))
    except ImageRefused as refusal:
        discard(upload, storage)
        raise ValidationError("file", str(refusal)) from None
    except (ValidationError, QuotaExceeded):  # it could only be refused again
        discard(upload, storage)
        raise


def _mark_done(upload, image):
    """In the image's transaction: the upload is done, if nobody removed it meanwhile."""
    done = Upload.update(offset=upload.length, image=image.id, state="{}", hash_state=None,
                         head=None).where(Upload.id == upload.id,
                                          Upload.offset == upload.offset).execute()
    if not done:
        raise not_found()


class PieceDigests:
    """What a piece's bytes are hashed into, on receive_body's hash thread: the upload's
    running sha256, the piece's own Upload-Checksum, and the file's first bytes while its
    header is not all in."""

    def __init__(self, upload, checksum):
        saved = upload.hash_state
        self.running = ResumableSha256(bytes.fromhex(saved)) if AVAILABLE and saved else None
        self.checksum = checksum
        self._piece = CHECKSUMS[checksum[0]]() if checksum else None
        self._head = bytearray(upload.head or b"") if upload.offset < HEADER_READ_SIZE else None

    def update(self, data):
        if self.running is not None:
            self.running.update(data)
        if self._piece is not None:
            self._piece.update(data)
        if self._head is not None and len(self._head) < HEADER_READ_SIZE:
            self._head += data[:HEADER_READ_SIZE - len(self._head)]

    def hexdigest(self):
        """The sha256 of the file so far, or None where no state is kept (file_sha256)."""
        return self.running.hexdigest() if self.running is not None else None

    def verify(self):
        """460 when the piece's bytes do not have the Upload-Checksum sent with them."""
        if self.checksum and self._piece.digest() != self.checksum[1]:
            raise ApiError(460, f"Checksum Mismatch: the piece's {self.checksum[0]} is not "
                                "the Upload-Checksum sent; it was not kept")

    def saved_state(self):
        return self.running.state().hex() if self.running is not None else None

    def head(self):
        """The first bytes to keep in the row: None once the header's are all in."""
        if self._head is None or len(self._head) >= HEADER_READ_SIZE:
            return None
        return bytes(self._head)
