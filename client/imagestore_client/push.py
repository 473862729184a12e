"""push: a file to /uploads by tus 1.0 (creation, checksum), in pieces.

Spoken directly, three kinds of request (POST to create, PATCH a piece, HEAD to ask where
the server is): docs/client.md says why not tuspy. Each piece carries its sha256
(Upload-Checksum), computed on a second thread while the piece before it is sent; the whole
file's sha256 goes in the metadata, and the server checks it at the end. After a break the
client asks the server for its Upload-Offset (HEAD), waits until the upload is free again (an
empty PATCH: 409 while the broken request still holds it) and goes on; the upload's URL is kept
in STATE/uploads/<key>.json, key of the server, the file (path, size, mtime) and the name, so
that running the same push again resumes it.
"""

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urljoin

from imagestore_client.errors import ClientError, NotFoundError, ServerError, UsageError
from imagestore_client.progress import Progress
from imagestore_client.retry import Retries
from imagestore_client.server import NAME, TIMEOUT, Broken, error_of, find_image, where

TUS = {"Tus-Resumable": "1.0.0"}
PIECE_SIZE = 64 << 20
READ = 1 << 20
# The answer to the last piece comes after the server has checked the image (qemu-img
# under a CPU budget of seconds per GiB, maybe after waiting for a check slot).
FINISH_TIMEOUT = (10, 900)
# Answers to a PATCH after which the next try starts from the server's Upload-Offset:
# a piece that arrived damaged, a restarting server behind a proxy (counted as breaks),
# and a conflict: another request holds the upload (the one a break cut off, not yet ended
# on the server's side, or the last piece, being checked) or moved its offset.
TRY_AGAIN = (460, 502, 503, 504)
CONFLICT = (409, 423)
# A conflict means the server is there and busy with the upload: tried again at once, then
# after 0.25, 0.5 and 1 second (a broken request ends on the server within moments), then
# every 2 seconds, for as long as the server may take to check the last piece.
CONFLICT_TRIES = FINISH_TIMEOUT[1] // 2


def conflict_pause(failures):
    """Seconds to wait before asking again after this many conflicts in a row."""
    return 0 if failures <= 1 else min(2, 0.25 * 2 ** (failures - 2))


class Conflict(Broken):
    """409 or 423 to a piece: the upload is busy elsewhere, or at another offset."""


def encode_metadata(fields):
    """Upload-Metadata: `key base64(value)` pairs joined by commas; None values left out."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in fields.items() if value is not None)


def checksum(fd, offset, length):
    """`sha256 <base64>` of length bytes of the file from offset (Upload-Checksum)."""
    digest = hashlib.sha256()
    while length > 0:
        block = os.pread(fd, min(READ, length), offset)
        if not block:
            raise OSError("the file shrank while it was being sent")
        digest.update(block)
        offset, length = offset + len(block), length - len(block)
    return "sha256 " + base64.b64encode(digest.digest()).decode()


def file_sha256(path, size, quiet):
    """The hex sha256 of the whole file, with a bar (it takes a while for a big one)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file, Progress("sha256", size, quiet=quiet, summary=False) as bar:
        for block in iter(lambda: file.read(4 * READ), b""):
            digest.update(block)
            bar.advance(len(block))
    return digest.hexdigest()


class PieceBody:
    """One piece of the file as a request body: read with pread, counted into progress."""

    def __init__(self, fd, offset, length, progress):
        self.fd, self.offset, self.length, self.progress = fd, offset, length, progress
        self.sent = 0

    def __len__(self):
        return self.length

    def read(self, size=-1):
        left = self.length - self.sent
        size = left if size is None or size < 0 else min(size, left)
        if size == 0:
            return b""
        block = os.pread(self.fd, size, self.offset + self.sent)
        if not block:
            raise OSError("the file shrank while it was being sent")
        self.sent += len(block)
        self.progress.advance(len(block))
        return block


class Checksums:
    """Checksums of pieces, the next one computed on a second thread ahead of its turn."""

    def __init__(self, fd):
        self.fd, self.pool, self.ahead = fd, ThreadPoolExecutor(1), {}

    def get(self, offset, length, next_length):
        """The checksum of (offset, length); starts on (offset + length, next_length)."""
        future = self.ahead.pop((offset, length), None)
        self.ahead.clear()
        if next_length:
            self.ahead[(offset + length, next_length)] = self.pool.submit(
                checksum, self.fd, offset + length, next_length)
        return future.result() if future else checksum(self.fd, offset, length)

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class SavedUpload:
    """This push's record in the state folder: the upload URL and the file's sha256."""

    def __init__(self, state, server_url, path, stat, name, namespace):
        who = [server_url, str(path), stat.st_size, stat.st_mtime_ns, name, namespace or ""]
        key = hashlib.sha256(json.dumps(who).encode()).hexdigest()[:32]
        self.folder = state / "uploads"
        self.path = self.folder / f"{key}.json"

    def load(self):
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save(self, record):
        """Write the record whole (a temporary file renamed over the old one), private."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(record, file)
        os.replace(temporary, self.path)

    def remove(self):
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self):
        """This push alone: a second run of it while one is going on is refused."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClientError("this push is already running in another process") from None
            yield


def where_upload_is(response):
    """(Upload-Offset, Image-Location or None) of an answer about an upload."""
    offset = response.headers.get("Upload-Offset", "")
    if not offset.isdigit():
        raise ClientError(f"the server's answer ({response.status_code}) has no Upload-Offset")
    return int(offset), response.headers.get("Image-Location")


def probe(server, url):
    """(Upload-Offset, Image-Location or None) of an upload; None when it is gone."""
    response = server.send("HEAD", url, expect=(200, 204, 404, 410), headers=TUS)
    if response.status_code in (404, 410):
        return None
    return where_upload_is(response)


def create(server, size, name, namespace, sha256):
    """POST /uploads: the new upload's absolute URL (name, size and quota checked now)."""
    metadata = encode_metadata({"name": name, "namespace": namespace, "sha256": sha256})
    try:
        response = server.send("POST", "/uploads", expect=(201,), headers={
            **TUS, "Upload-Length": str(size), "Upload-Metadata": metadata})
    except ServerError as error:
        if error.status not in (404, 405):
            raise
        raise ClientError(f"this server takes no resumable uploads at /uploads ({error}); "
                          "it needs a newer imagestore") from None
    if "Location" not in response.headers:
        raise ClientError("the server created an upload but gave no Location")
    return urljoin(response.url, response.headers["Location"])


def answer_of(server, response):
    """(Upload-Offset, Image-Location or None) of a 204 to a PATCH; Conflict or Broken for
    an answer after which the next try goes on from the server's offset."""
    if response.status_code != 204:
        kind = Conflict if response.status_code in CONFLICT else Broken
        raise kind(str(error_of(response, server.token)))
    return where_upload_is(response)


def patch(server, url, offset, body=b"", checksum=None, timeout=TIMEOUT):
    """PATCH body at offset; its answer_of."""
    headers = {**TUS, "Content-Type": "application/offset+octet-stream",
               "Upload-Offset": str(offset)}
    if checksum:
        headers["Upload-Checksum"] = checksum
    response = server.send("PATCH", url, expect=(204, *TRY_AGAIN, *CONFLICT), headers=headers,
                           data=body, timeout=timeout)
    return answer_of(server, response)


def send_piece(server, url, pieces, offset, length, size, progress):
    """PATCH one piece: (the new Upload-Offset, Image-Location once the image is stored)."""
    next_length = min(length, size - offset - length)
    return patch(server, url, offset, PieceBody(pieces.fd, offset, length, progress),
                 pieces.get(offset, length, next_length),
                 FINISH_TIMEOUT if offset + length == size else TIMEOUT)


def resume_point(server, url, size):
    """Where to go on after a break: the server's offset (HEAD), once the upload is free.
    An empty PATCH at that offset asks; the server answers it 409 while the broken request
    still holds the upload, which would have cost a whole piece's bytes sent for nothing."""
    where_now = probe(server, url)
    if where_now is None:
        raise ServerError(410, {"message": "the upload is gone (expired?)"})
    offset, location = where_now
    if location or offset >= size:
        return offset, location
    return patch(server, url, offset)


def wait_for_image(server, url, deadline=FINISH_TIMEOUT[1]):
    """The image's URL once the server has checked an upload whose last answer was lost."""
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        where_now = probe(server, url)
        if where_now is None:
            raise ClientError("the server refused or dropped the upload after its last piece "
                              "(its answer was lost in a broken connection)")
        if where_now[1]:
            return where_now
        time.sleep(2)  # the server is still checking the image: nothing to wait on but it
    raise ClientError("the server did not finish checking the upload in time")


def send_pieces(server, url, fd, size, piece_size, retries, progress, new=True):
    """Send the file, piece after piece, from the start of a new upload, else from where the
    server stands; the same after each break. Returns the image's URL."""
    attempts, pieces = Retries(retries, progress), Checksums(fd)
    conflicts = Retries(CONFLICT_TRIES, pauses=conflict_pause)
    offset, location, known = 0, None, new
    try:
        while True:
            try:
                if not known:
                    (offset, location), known = resume_point(server, url, size), True
                    progress.rewind(offset)
                if location:
                    return location
                if offset >= size:
                    offset, location = wait_for_image(server, url)
                    continue
                length = min(piece_size, size - offset)
                offset, location = send_piece(server, url, pieces, offset, length, size, progress)
                attempts.ok()
                conflicts.ok()
            except Conflict as error:
                conflicts.failed(error)
                known = False
            except Broken as error:
                attempts.failed(error)
                known = False
    finally:
        pieces.close()


def regular_file(path):
    """The path and its stat, if it is a regular file (else a usage error)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    if not path.is_file():
        raise UsageError(f"not a regular file: {path}")
    return path, stat


def check_name_free(server, name, namespace):
    """Refuse at once (before hashing a big file) a name that is already taken."""
    try:
        image = find_image(server, name, namespace)
    except NotFoundError:
        return
    raise ClientError(f"an image named {name} exists {where(namespace)} (id {image['id']}): "
                      "rm it first, or push under another name")


def start(server, saved, path, stat, name, namespace, quiet):
    """(upload URL, whether it is new, its offset): the saved upload while the server still
    has it, else a new one."""
    record = saved.load()
    if record.get("url"):
        where_now = probe(server, record["url"])
        if where_now is not None:
            return record["url"], False, where_now[0]
        print("imagestore: the earlier upload of this file is gone; starting again",
              file=sys.stderr)
    check_name_free(server, name, namespace)
    sha256 = record.get("sha256") or file_sha256(path, stat.st_size, quiet)
    saved.save({"sha256": sha256})
    url = create(server, stat.st_size, name, namespace, sha256)
    saved.save({"sha256": sha256, "url": url})
    return url, True, 0


def push(server, config, file, name, namespace=None, piece_size=PIECE_SIZE, quiet=False):
    """Upload file as image name (in namespace), resuming an earlier run; the image's URL."""
    if not NAME.fullmatch(name):
        raise UsageError(f"not a valid image name: {name!r} (letters, digits, _ and -; "
                         "at most 64)")
    path, stat = regular_file(file)
    saved = SavedUpload(config.state, server.base, path, stat, name, namespace)
    with saved.locked():
        url, new, offset = start(server, saved, path, stat, name, namespace, quiet)
        try:
            with open(path, "rb") as body, \
                    Progress("pushed", stat.st_size, offset, quiet) as progress:
                location = send_pieces(server, url, body.fileno(), stat.st_size, piece_size,
                                       config.retries, progress, new)
        except ServerError as error:
            if error.status in (400, 404, 410):  # refused at the end, or gone: nothing to resume
                saved.remove()
            raise
        saved.remove()
    return location
