"""Receiving an upload: the checks made from headers alone, then the body streamed to disk."""

import contextlib
import ctypes
import errno
import hashlib
import queue
import socket
import threading
import time

from gunicorn.http.errors import ChunkMissingTerminator, NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from errors import DISK_FULL, ApiError, ValidationError

# FACTS.md: 1 MiB reads cost a fifth of the CPU of 8 KiB reads; 4 MiB is no faster.
CHUNK_SIZE = 1 << 20
# Every this many bytes, the kernel is asked to start writing them to disk (see start_writeback).
WRITEBACK_STEP = 8 << 20
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """Linux's sync_file_range from the C library, or None where there is none."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd, offset, length):
    """Have the kernel start writing a range of the file to disk, without waiting for it.

    The store fsyncs every upload before keeping it; started this way while the rest of the
    body arrives, the disk works alongside the network, and that fsync of a 1 GiB upload
    waits 3 ms instead of 250 ms (docs/benchmarks.md). Only a hint: errors are ignored.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def check_upload_headers(request, max_size):
    """Refuse before reading: no body (411), too large a body (413), compressed body (415)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "Content-Encoding not supported: send the image uncompressed")
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and not chunked:
        raise ApiError(411, "Length Required: send the image as the request body")
    if length is not None and length > max_size:
        raise too_large(max_size)


def too_large(max_size):
    """The 413 for a body past MAX_IMAGE_SIZE."""
    return ApiError(413, f"Image larger than the limit of {max_size} bytes")


def body_stream(request):
    """The image's bytes and how many there must be: the raw body and its Content-Length
    (None when chunked), or the `file` field of a multipart form (length unknown)."""
    if request.mimetype != "multipart/form-data":
        return request.stream, request.content_length
    upload = _form_file(request)
    if upload is None:
        raise ValidationError("file", "File field required in a multipart/form-data body")
    return upload.stream, None


def _form_file(request):
    """The form's `file` field; Werkzeug reads the whole form first, so a body that breaks
    while it does is turned into an API error here."""
    try:
        return request.files.get("file")
    except ParseException as error:
        raise broken_framing(error) from None
    except (ClientDisconnected, NoMoreData) as error:  # not OSError: a full disk is a 507
        raise cut_off() from error


class HashOnTheSide:
    """A sha256 computed on its own thread while the request's thread reads and writes.

    hashlib lets go of the GIL while it hashes a large chunk, so the hash runs on another
    core; the bounded queue keeps at most QUEUE_CHUNKS chunks waiting (bounded memory).
    """

    QUEUE_CHUNKS = 4

    def __init__(self):
        self._sha256 = hashlib.sha256()
        self._chunks = queue.Queue(self.QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._hash, name="upload-sha256", daemon=True)
        self._thread.start()

    def _hash(self):
        while (chunk := self._chunks.get()) is not None:
            self._sha256.update(chunk)

    def update(self, chunk):
        self._chunks.put(chunk)

    def finish(self):
        """Wait for the hash of everything given so far; return it as hex."""
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()
        return self._sha256.hexdigest()


class BodyWatch:
    """Cut the connection's reading side when a piece of the body is slower than timeout.

    A client sending a few bytes a second would otherwise hold a worker thread as long as
    it likes: the server's read of a piece returns only when the piece is complete, so a
    socket timeout, which counts per recv, never fires. Shutting the socket's reading side
    ends the blocked read at once; the answer can still be written.
    """

    def __init__(self, sock, timeout):
        self.expired = False
        self.timeout, self._sock = timeout, sock
        self._deadline = time.monotonic() + timeout
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="body-watch", daemon=True).start()

    def progress(self):
        """A piece arrived: the next one has a full timeout again."""
        self._deadline = time.monotonic() + self.timeout

    def stop(self):
        self._done.set()

    def _watch(self):
        while not self._done.wait(max(0.0, self._deadline - time.monotonic())):
            if time.monotonic() >= self._deadline:
                self.expired = True
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RD)
                return


@contextlib.contextmanager
def watch_body(request, timeout):
    """A BodyWatch on the request's socket when the server exposes it (gunicorn), else None."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None or not timeout:
        yield None
        return
    watch = BodyWatch(sock, timeout)
    try:
        yield watch
    finally:
        watch.stop()


def receive_body(stream, out, max_size, expected_length=None, watch=None):
    """Copy stream into the file out in bounded memory; return (size, sha256 hex).

    A body shorter than its Content-Length was cut off: gunicorn hands the short body
    over without an error, so the count is checked here.
    """
    digest = HashOnTheSide()
    try:
        size = written_back = 0
        while chunk := _read(stream, max_size, watch):
            size += len(chunk)
            if size > max_size:
                raise too_large(max_size)
            digest.update(chunk)
            write_or_507(out, chunk)
            if size - written_back >= WRITEBACK_STEP:
                start_writeback(out.fileno(), written_back, size - written_back)
                written_back = size
            if watch:
                watch.progress()
    finally:
        sha256 = digest.finish()  # also on errors: no thread is left behind
    if watch and watch.expired:
        raise too_slow(watch)
    if expected_length is not None and size != expected_length:
        raise cut_off()
    return size, sha256


def cut_off():
    return ApiError(400, "Upload cut off before the end of the body")


def too_slow(watch):
    return ApiError(408, f"Request Timeout: the body stalled for {watch.timeout} seconds")


def broken_framing(error):
    """The 400 for a chunked body whose framing gunicorn's reader refused.

    gunicorn raises its parser's own exceptions through the request's stream (a bad chunk
    size, no CRLF after a chunk, a bad extension, an endless size line or trailer). A
    terminator missing because the body simply ended is a cut-off body, not bad framing.
    """
    if isinstance(error, ChunkMissingTerminator) and len(error.term or b"") < 2:
        return cut_off()
    what = str(error).split(":", 1)[0][:80]
    return ApiError(400, f"Malformed chunked transfer encoding in the body: {what}")


def _read(stream, max_size, watch=None):
    """Read one chunk, turning the ways a body can end badly into API errors."""
    try:
        return stream.read(CHUNK_SIZE)
    except RequestEntityTooLarge:
        raise too_large(max_size) from None
    except ParseException as error:
        raise broken_framing(error) from None
    except (ClientDisconnected, OSError) as error:
        # The client went away, the chunked framing broke, or the watch cut a slow body.
        if watch and watch.expired:
            raise too_slow(watch) from error
        raise cut_off() from error


def write_or_507(out, chunk):
    """Write to the store's disk; a full disk is the server's 507, not a crash."""
    view = memoryview(chunk)
    try:
        while view:  # an unbuffered write may take only part of the chunk
            view = view[out.write(view):]
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, DISK_FULL) from error
        raise
