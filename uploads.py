"""Receiving an upload: the checks made from headers alone, then the body streamed to disk."""

import contextlib
import ctypes
import errno
import hashlib
import io
import queue
import socket
import threading
import time

from flask import Response, after_this_request
from gunicorn.http.errors import ChunkMissingTerminator, NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

import metrics
from directio import DirectWrites, aligned_buffer
from errors import DISK_FULL, ApiError, ValidationError
from socketbody import socket_body

# 1 MiB reads cost a fifth of the CPU of 8 KiB reads; 4 MiB ones are no faster.
CHUNK_SIZE = 1 << 20
# Buffers of CHUNK_SIZE that an upload's bytes pass through, in turn: one being filled
# while the others wait for the hash thread, which keeps pace; more would only cost memory.
RING_BUFFERS = 4
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


def declared_length(request):
    """The image's length as the headers tell it, before any body byte is read: a raw
    body's Content-Length; None when chunked, or for a form (its length counts the form)."""
    return None if request.mimetype == "multipart/form-data" else request.content_length


def body_stream(request):
    """The image's bytes and how many there must be: the raw body and its Content-Length
    (None when chunked), or the `file` field of a multipart form (length unknown)."""
    if request.mimetype != "multipart/form-data":
        return raw_body(request.environ) or request.stream, request.content_length
    upload = _form_file(request)
    if upload is None:
        raise ValidationError("file", "File field required in a multipart/form-data body")
    return upload.stream, None


def raw_body(environ):
    """The body to read without Werkzeug's wrapper, when the server ends it: straight from
    gunicorn's socket where that is clean, else the server's own stream. None otherwise.

    Werkzeug's stream, limited by MAX_CONTENT_LENGTH, refuses a read at the limit even
    where the body ends there (a body of exactly MAX_IMAGE_SIZE was a 413), and copies
    each piece once more; the limit and the Content-Length are checked here instead.
    """
    if "wsgi.input_terminated" not in environ:
        return None
    return socket_body(environ) or environ["wsgi.input"]


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
    """A sha256 computed on its own thread, from the buffers of a ring, while the request's
    thread reads into the others and writes.

    hashlib lets go of the GIL while it hashes a large piece, so the hash runs on another
    core. A buffer goes back to the ring only once it was hashed, and the reader writes a
    buffer out before it takes the next one: so no buffer is filled again before it was
    both written and hashed, and memory stays at the ring's buffers.
    """

    def __init__(self, ring, hasher=None):
        self._sha256 = hashlib.sha256() if hasher is None else hasher
        self._ring = ring
        self._pieces = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._hash, name="upload-sha256", daemon=True)
        self._thread.start()

    def _hash(self):
        try:
            while (piece := self._pieces.get()) is not None:
                buffer, length = piece
                self._sha256.update(memoryview(buffer)[:length])
                self._ring.put(buffer)
        finally:
            self._ring.put(None)  # a reader waiting for a buffer must not wait for ever

    def update(self, buffer, length):
        """Hash the first length bytes of buffer; it returns to the ring afterwards."""
        self._pieces.put((buffer, length))

    def finish(self):
        """Wait for the hash of everything given so far; return it as hex."""
        if self._thread.is_alive():
            self._pieces.put(None)
            self._thread.join()
        return self._sha256.hexdigest()


def buffer_ring(count, size):
    """A queue holding count preallocated buffers of size bytes: the only memory an
    upload's bytes pass through (a fresh bytes object for each piece read costs glibc an
    mmap, a munmap and zeroed pages every time; docs/benchmarks.md)."""
    ring = queue.SimpleQueue()
    for _ in range(count):
        ring.put(aligned_buffer(size))  # page-aligned, for direct I/O (directio.py)
    return ring


def take_buffer(ring):
    """The next buffer that was both written and hashed, waiting for one if need be."""
    buffer = ring.get()
    if buffer is None:
        raise RuntimeError("the upload's hash thread stopped")
    return buffer


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


def receive_body(stream, out, max_size, expected_length=None, watch=None, check_start=None,
                 start_size=64 * 1024, hasher=None):
    """Copy stream into the file out through a ring of reused buffers; return (size, sha256).

    check_start, if given, is called with the body's first start_size bytes (at most
    CHUNK_SIZE) as soon as they are in, never for a shorter body; what it raises ends the
    upload there, the rest of the body unread. A body shorter than its Content-Length was
    cut off: gunicorn hands the short body over without an error, so the count is checked.
    A body that ends early (cut off, or stalled) raises BodyEndedEarly, whose `received`
    counts the bytes written (and hashed) before. hasher, if given, is what the bytes are
    hashed with instead of a new sha256 (its hexdigest() is returned): a tus piece goes on
    with its upload's hash.
    """
    ring = buffer_ring(RING_BUFFERS, CHUNK_SIZE)
    digest = HashOnTheSide(ring, hasher)
    reader = BodyReader(stream, max_size, watch)
    size = 0
    body_file = BodyFile(out)
    try:
        while True:
            buffer = take_buffer(ring)
            # Never more than one byte past the limit: that byte is the 413.
            view = memoryview(buffer)[:min(CHUNK_SIZE, max_size + 1 - size)]
            length = reader.fill(view, start_size if size == 0 and check_start else 0)
            if size == 0 and check_start and length >= start_size:
                check_start(bytes(view[:start_size]))
                length += reader.fill(view[length:])
            size += length
            if size > max_size:
                raise too_large(max_size)
            digest.update(buffer, length)
            body_file.write(view[:length])
            if watch:
                watch.progress()
            if length < len(view):  # the body ended
                break
    except BodyEndedEarly as error:
        error.received = size
        raise
    finally:
        body_file.close()
        sha256 = digest.finish()  # also on errors: no thread is left behind
    if watch and watch.expired:
        raise too_slow(watch, size)
    if expected_length is not None and size != expected_length:
        raise cut_off(size)
    return size, sha256


class BodyFile:
    """The file a body goes into: its whole buffers written with direct I/O where it can be
    (directio.py), the rest through the page cache with the kernel's writeback started every
    WRITEBACK_STEP bytes."""

    def __init__(self, out):
        self._out, self._direct = out, DirectWrites(out)
        self._origin, self._written, self._written_back = out.tell(), 0, 0

    def write(self, view):
        write_or_507(self._out, view, self._direct)
        self._written += len(view)
        if self._written - self._written_back >= WRITEBACK_STEP:
            # At the file's own offsets: a tus piece is written after the ones before.
            start_writeback(self._out.fileno(), self._origin + self._written_back,
                            self._written - self._written_back)
            self._written_back = self._written

    def close(self):
        """Direct I/O off again, for the fsync and whoever writes next."""
        self._direct.close()


class BodyReader:
    """Fills the caller's buffers from a body: by readinto where the stream has a real one,
    else by read and a copy; the ways a body can end badly become API errors."""

    def __init__(self, stream, max_size, watch):
        self._stream, self._max_size, self._watch = stream, max_size, watch
        self._readinto = getattr(stream, "readinto", None)

    def fill(self, view, stop_at=0):
        """Fill view (or only its first stop_at bytes); fewer only where the body ends."""
        wanted, filled = min(stop_at or len(view), len(view)), 0
        try:
            while filled < wanted and (got := self._read_into(view[filled:wanted])):
                filled += got
        finally:
            metrics.count_received(filled)  # once a piece (1 MiB), a broken one's part too
        return filled

    def _read_into(self, view):
        try:
            return self._into(view)
        except RequestEntityTooLarge:
            raise too_large(self._max_size) from None
        except (ParseException, ClientDisconnected, OSError) as error:
            # The watch cut a slow body (and so perhaps a chunk's framing), the framing
            # broke, or the client went away.
            if self._watch and self._watch.expired:
                raise too_slow(self._watch) from error
            if isinstance(error, ParseException):
                raise broken_framing(error) from None
            raise cut_off() from error

    def _into(self, view):
        if self._readinto is not None:
            try:
                return self._readinto(view)
            except (NotImplementedError, io.UnsupportedOperation):
                self._readinto = None  # io.RawIOBase's placeholder: the stream only reads
        data = self._stream.read(len(view))
        view[:len(data)] = data
        return len(data)


class BodyEndedEarly(ApiError):
    """A body that was cut off or stalled; received: the bytes written before, if known."""

    def __init__(self, status, message, received=None):
        super().__init__(status, message)
        self.received = received


def cut_off(received=None):
    return BodyEndedEarly(400, "Upload cut off before the end of the body", received)


def too_slow(watch, received=None):
    return BodyEndedEarly(408, f"Request Timeout: the body stalled for {watch.timeout} seconds",
                          received)


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


def write_or_507(out, chunk, direct=None):
    """Write to the store's disk, the whole blocks by direct I/O if direct (a DirectWrites)
    is on; a full disk is the server's 507, not a crash."""
    view = memoryview(chunk)  # slices of a view copy nothing
    try:
        if direct is not None:
            view = direct.write_blocks(view)
        while view:  # an unbuffered write may take only part of the chunk
            view = view[out.write(view):]
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, DISK_FULL) from error
        raise


class ClosingResponse(Response):
    """An answer after which the server closes the connection (`Connection: close`).

    gunicorn drops the Connection header an application sets (it is hop-by-hop), and would
    keep the connection, reading and dropping what is left of the body first. The
    start_response it passes is a method of its own response object, which can be told to
    close instead; other servers are left to themselves.
    """

    def __call__(self, environ, start_response):
        force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
        if force_close is not None:
            force_close()
        return super().__call__(environ, start_response)


def close_connection_on_error():
    """Have an error answer to this request close the connection: the rest of the body
    may still be coming (20 GiB of it, perhaps), and is never read."""
    after_this_request(_closing_if_error)


def _closing_if_error(response):
    return ClosingResponse.force_type(response) if response.status_code >= 400 else response
