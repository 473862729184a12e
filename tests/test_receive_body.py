"""receive_body: the bytes land on disk and hash right while the hash runs on its own thread
and writeback starts on the way, and no thread is left behind when a body fails."""

import hashlib
import io
import os
import socket
import threading

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

import uploads
from errors import ApiError
from socketbody import ChunkedSocketBody, SocketBody, socket_body


class Body(io.RawIOBase):
    """A request body that gives `data` in uneven pieces, then optionally fails."""

    def __init__(self, data, fail_at=None):
        self.data, self.position, self.fail_at = data, 0, fail_at

    def read(self, size=-1):
        if self.fail_at is not None and self.position >= self.fail_at:
            raise OSError("connection reset")
        piece = self.data[self.position:self.position + min(size, 300_001)]
        self.position += len(piece)
        return piece


@pytest.fixture
def small_steps(monkeypatch):
    """Small chunks and writeback steps, so a small body goes through every branch."""
    monkeypatch.setattr(uploads, "CHUNK_SIZE", 64 * 1024)
    monkeypatch.setattr(uploads, "WRITEBACK_STEP", 256 * 1024)


def hash_threads():
    return [t for t in threading.enumerate() if t.name == "upload-sha256"]


def test_body_is_written_and_hashed_exactly(tmp_path, small_steps):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out:
        size, digest = uploads.receive_body(Body(data), out, max_size=len(data))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert hash_threads() == []


@pytest.mark.parametrize("body, status", [
    (Body(b"x" * 2_000_000), 413),                   # longer than the limit
    (Body(b"x" * 2_000_000, fail_at=900_000), 400),  # the client goes away
])
def test_failed_body_leaves_no_hash_thread(tmp_path, small_steps, body, status):
    with open(tmp_path / "staged", "xb", buffering=0) as out, \
            pytest.raises(ApiError) as error:
        uploads.receive_body(body, out, max_size=1_500_000)
    assert error.value.status == status
    assert hash_threads() == []


# The ring of buffers -----------------------------------------------------------------------

class IntoBody:
    """A request body with a real readinto that fills the caller's buffer in odd pieces,
    and notes which buffer objects it was asked to fill and how far it was read."""

    def __init__(self, data, piece=300_001):
        self.data, self.position, self.piece = data, 0, piece
        self.buffers = set()

    def readinto(self, view):
        self.buffers.add(id(view.obj))
        got = len(self.data[self.position:self.position + min(len(view), self.piece)])
        view[:got] = self.data[self.position:self.position + got]
        self.position += got
        return got


CHUNK = 64 * 1024  # the chunk size under small_steps


@pytest.mark.parametrize("length", [
    1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 4 * CHUNK, 9 * CHUNK + 12345, 40 * CHUNK - 3,
])
@pytest.mark.parametrize("body_class", [Body, IntoBody], ids=["read", "readinto"])
def test_odd_sizes_hash_and_land_right_through_a_ring_of_buffers(tmp_path, small_steps,
                                                                 length, body_class):
    """Bodies crossing the buffers' boundaries anywhere, from a stream that reads or one
    that fills the buffers itself: the file and the hash are the body's."""
    data = os.urandom(length)
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out:
        size, digest = uploads.receive_body(body_class(data), out, max_size=length)
    assert (size, digest) == (length, hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert hash_threads() == []


def test_the_same_few_buffers_take_every_piece(tmp_path, small_steps):
    """An upload of 40 buffers' worth goes through RING_BUFFERS buffer objects, no more."""
    body = IntoBody(os.urandom(40 * CHUNK + 5), piece=10_000)
    with open(tmp_path / "staged", "xb", buffering=0) as out:
        uploads.receive_body(body, out, max_size=len(body.data))
    assert len(body.buffers) == uploads.RING_BUFFERS


def test_a_buffer_is_filled_again_only_after_it_was_hashed(tmp_path, monkeypatch):
    """Two tiny buffers handed to and fro some 4000 times: had one been refilled while the
    hash thread still read it, the hash would not be the body's."""
    monkeypatch.setattr(uploads, "CHUNK_SIZE", 4096)
    monkeypatch.setattr(uploads, "RING_BUFFERS", 2)
    body = IntoBody(os.urandom(16 * 1024 * 1024 + 1))
    with open(tmp_path / "staged", "xb", buffering=0) as out:
        _, digest = uploads.receive_body(body, out, max_size=len(body.data))
    assert digest == hashlib.sha256(body.data).hexdigest()
    assert len(body.buffers) == 2


def test_a_failed_write_is_raised_and_stops_the_reading(tmp_path, small_steps, monkeypatch):
    """A full disk at the third buffer is the 507: the body read no further than that
    buffer, nothing written after it, and no thread left."""
    write, calls = uploads.write_or_507, []

    def full_disk(out, chunk, direct=None):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise ApiError(507, "Insufficient Storage")
        write(out, chunk, direct)

    monkeypatch.setattr(uploads, "write_or_507", full_disk)
    body = IntoBody(os.urandom(40 * CHUNK))
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out, pytest.raises(ApiError) as error:
        uploads.receive_body(body, out, max_size=len(body.data))
    assert error.value.status == 507
    assert len(calls) == 3
    assert path.read_bytes() == body.data[:2 * CHUNK]
    assert body.position == 3 * CHUNK
    assert hash_threads() == []


@pytest.mark.parametrize("length, status", [(1_500_000, 201), (1_500_001, 413)])
def test_the_limit_is_the_largest_body_taken(tmp_path, small_steps, length, status):
    """A body of unknown length (chunked) of exactly the limit is taken; one byte more is
    a 413, with at most that one byte read past the limit."""
    body = IntoBody(os.urandom(length + 100_000)[:length])
    with open(tmp_path / "staged", "xb", buffering=0) as out:
        if status == 413:
            with pytest.raises(ApiError) as error:
                uploads.receive_body(body, out, max_size=1_500_000)
            assert error.value.status == 413
        else:
            assert uploads.receive_body(body, out, max_size=1_500_000)[0] == length
    assert body.position <= 1_500_001
    assert hash_threads() == []


# The start of the body, vetted as soon as it is in -----------------------------------------

class Refused(Exception):
    pass


def test_the_start_is_checked_before_more_is_read(tmp_path, small_steps):
    data = os.urandom(10 * CHUNK)
    body, seen = IntoBody(data, piece=1000), []

    def check(start):
        seen.append((start, body.position))
        raise Refused

    with open(tmp_path / "staged", "xb", buffering=0) as out, pytest.raises(Refused):
        uploads.receive_body(body, out, len(data), len(data), check_start=check,
                             start_size=5000)
    assert seen == [(data[:5000], 5000)]  # the first 5000 bytes, and no byte more read
    assert hash_threads() == []


def test_a_start_that_passes_lets_the_whole_body_through(tmp_path, small_steps):
    data, seen = os.urandom(10 * CHUNK + 3), []
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out:
        size, digest = uploads.receive_body(IntoBody(data), out, len(data), len(data),
                                            check_start=seen.append, start_size=CHUNK)
    assert seen == [data[:CHUNK]]
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data


def test_a_body_shorter_than_the_start_is_left_to_the_end(tmp_path, small_steps):
    seen = []
    with open(tmp_path / "staged", "xb", buffering=0) as out:
        uploads.receive_body(IntoBody(b"QFI\xfb"), out, 100, check_start=seen.append,
                             start_size=5000)
    assert seen == []


# Straight from gunicorn's socket, as gunicorn's own parser leaves it -------------------------

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def gunicorn_request():
    """parse(raw): gunicorn's parser on one end of a socket pair, raw sent into the other
    by a thread (which then hangs up, if told to); returns the parser and the WSGI environ
    of the first request."""
    sockets = []

    def parse(raw, hang_up=False):
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))

        def send():
            theirs.sendall(raw)
            if hang_up:
                theirs.shutdown(socket.SHUT_WR)

        threading.Thread(target=send, daemon=True).start()
        parser = RequestParser(Config(), ours, ("127.0.0.1", 1))
        _, environ = wsgi.create(next(parser), ours, ("127.0.0.1", 1), ("127.0.0.1", 2),
                                 Config())
        return parser, environ

    yield parse
    for sock in sockets:
        sock.close()


def receive(environ, tmp_path, length=None, max_size=1 << 30):
    """receive_body on the request's socket body; return (size, sha256, the file's bytes)."""
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out:
        size, digest = uploads.receive_body(socket_body(environ), out, max_size, length)
    return size, digest, path.read_bytes()


@pytest.mark.parametrize("length", [100, 5 * CHUNK + 777])
def test_a_content_length_body_comes_straight_from_the_socket(tmp_path, small_steps,
                                                              gunicorn_request, length):
    """What came with the head and what follows, then the next request where it starts
    (a body of 100 bytes comes whole with the head, the next request behind it)."""
    data = os.urandom(length)
    parser, environ = gunicorn_request(
        b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length
        + data + NEXT_REQUEST)
    assert type(socket_body(environ)) is SocketBody
    assert receive(environ, tmp_path, length) == (length, hashlib.sha256(data).hexdigest(),
                                                  data)
    assert next(parser).path == "/next"


def chunked(*pieces, trailer=b""):
    return b"".join(b"%x;note=1\r\n%s\r\n" % (len(p), p) for p in pieces) + \
        b"0\r\n" + trailer + b"\r\n"


def test_a_chunked_body_comes_straight_from_the_socket(tmp_path, small_steps,
                                                       gunicorn_request):
    """Chunks of odd sizes across the buffers' boundaries, with extensions and a trailer:
    gunicorn parses the framing, and knows where the next request starts."""
    pieces = [os.urandom(n) for n in (1, 70_000, 3, 2 * CHUNK + 5, 9000)]
    parser, environ = gunicorn_request(
        b"POST /images HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(*pieces, trailer=b"X-Note: end\r\n") + NEXT_REQUEST)
    assert type(socket_body(environ)) is ChunkedSocketBody
    data = b"".join(pieces)
    assert receive(environ, tmp_path) == (len(data), hashlib.sha256(data).hexdigest(), data)
    assert parser.mesg.trailers == [("X-NOTE", "end")]
    assert next(parser).path == "/next"


@pytest.mark.parametrize("framing, message", [
    (b"5\r\nabcdeXX", "Malformed chunked transfer encoding"),
    (b"zz\r\n", "Malformed chunked transfer encoding"),
    (b"5\r\nab", "Upload cut off"),
])
def test_broken_chunks_from_the_socket_fail_the_body(tmp_path, gunicorn_request, framing,
                                                     message):
    """gunicorn's framing errors, and the connection marked as not to be used again."""
    _, environ = gunicorn_request(
        b"POST /images HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n" + framing, hang_up=True)
    with pytest.raises(ApiError) as error:
        receive(environ, tmp_path)
    assert (error.value.status, error.value.message.startswith(message)) == (400, True)
    assert environ["wsgi.input"].failed


def test_a_body_already_read_from_is_left_to_gunicorn(gunicorn_request):
    _, environ = gunicorn_request(
        b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    environ["wsgi.input"].read(3)
    assert socket_body(environ) is None
    assert uploads.raw_body(environ) is environ["wsgi.input"]
