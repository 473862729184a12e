"""An upload's body received straight from gunicorn's socket into the caller's buffers.

gunicorn's body reader hands out every piece as a new bytes object (several, in fact: it
buffers and slices them), and Werkzeug's stream copies it once more. Each such object of a
MiB is an mmap and a munmap in glibc, and every page of it is faulted in and zeroed again:
on the VMs measured, that cost more than moving the bytes (docs/benchmarks.md, "Upload path
without allocation"). Received with recv_into, the bytes land in the caller's buffers with
no allocation at all.

This reads gunicorn's state (its Body, the reader under it, their buffers) and keeps it
right, so that gunicorn still knows where the next request on the connection starts; it
is used only where that state is as gunicorn 27 leaves it before anything was read, and
tests/test_receive_body.py checks that against gunicorn's own parser.
"""

import inspect
import socket

from gunicorn.http.body import Body, ChunkedReader, LengthReader
from gunicorn.http.errors import ChunkMissingTerminator, NoMoreData


def socket_body(environ):
    """A reader of the request's body straight from its socket, when that is clean; else None.

    Clean: gunicorn's own body, over its Content-Length or chunked reader, on a plain TCP
    socket (TLS is left to gunicorn), and nothing read from it yet.
    """
    body, sock = environ.get("wsgi.input"), environ.get("gunicorn.socket")
    reader = getattr(body, "reader", None)
    if not (type(body) is Body and body.buf.tell() == 0 and type(sock) is socket.socket):
        return None
    if type(reader) is LengthReader and getattr(reader.unreader, "sock", None) is sock:
        return SocketBody(reader, sock)
    if (type(reader) is ChunkedReader and reader.buf.tell() == 0
            and getattr(reader.req.unreader, "sock", None) is sock
            and inspect.getgeneratorstate(reader.parser) == inspect.GEN_CREATED):
        return ChunkedSocketBody(body, reader, sock)
    return None


class SocketBody:
    """A Content-Length body, received straight into the caller's buffers.

    gunicorn's LengthReader keeps its count of what is left (`length`), as when it reads
    itself, so it still knows where the next request on the connection starts.
    """

    def __init__(self, reader, sock):
        self._reader, self._sock = reader, sock
        # What came in with the head is in gunicorn's unreader: read that part through
        # gunicorn's own reader (which takes it from there without touching the socket).
        ahead = reader.unreader.take_buffered()
        reader.unreader.unread(ahead)
        self._ahead = min(len(ahead), reader.length)

    def readinto(self, view):
        """Receive up to len(view) bytes of the body into view; 0 at its end."""
        wanted = min(len(view), self._reader.length)
        if not wanted:
            return 0
        if self._ahead:
            data = self._reader.read(min(wanted, self._ahead))
            view[:len(data)] = data
            self._ahead -= len(data)
            return len(data)
        got = self._sock.recv_into(view, wanted)
        self._reader.length -= got
        return got


class ChunkedSocketBody:
    """A chunked body: gunicorn's reader parses the framing, and each chunk's bytes are
    received straight into the caller's buffers.

    The size lines, their extensions, the CRLF after each chunk and the trailers are read
    and refused by gunicorn's own code (ChunkedReader.parse_chunk_size), with its limits
    and errors; this class only moves the chunks' bytes, as ChunkedReader.parse_chunked
    does. gunicorn is told what it needs: the body is used up once the last chunk came
    (its parser dropped), or failed (it never reuses the connection then).
    """

    def __init__(self, body, reader, sock):
        self._body, self._reader, self._sock = body, reader, sock
        self._unreader = reader.req.unreader
        self._left = 0  # bytes of the current chunk still to come
        self._rest = None  # bytes read after a size line; None before the first one
        self._ended = False

    def readinto(self, view):
        """Receive up to len(view) bytes of the body into view; 0 at its end."""
        try:
            if self._ended or (not self._left and not self._next_chunk()):
                return 0
            return self._chunk_bytes(view)
        except BaseException:
            self._body.failed = True
            raise

    def _next_chunk(self):
        """Read the CRLF after a chunk and the next size line; False after the last."""
        unreader, rest = self._unreader, self._rest
        if rest is not None:
            rest = bytes(rest)
            while len(rest) < 2 and (more := unreader.read()):
                rest += more
            if rest[:2] != b"\r\n":
                raise ChunkMissingTerminator(rest[:2])
            rest = rest[2:]
        size, rest = self._reader.parse_chunk_size(unreader, data=rest)
        if not size:
            self._ended, self._reader.parser = True, None
            return False
        self._left, self._rest = size, memoryview(rest)
        return True

    def _chunk_bytes(self, view):
        wanted = min(len(view), self._left)
        if self._rest:
            got = min(wanted, len(self._rest))
            view[:got], self._rest = self._rest[:got], self._rest[got:]
        else:
            got = self._sock.recv_into(view, wanted)
            if not got:
                raise NoMoreData()
        self._left -= got
        return got
