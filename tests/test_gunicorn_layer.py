"""What gunicorn itself does, against a real gunicorn from the Procfile: connections that
send nothing or send their head slowly, proxy headers, and gunicorn's own error answers."""

import contextlib
import json
import socket
import threading
import time
import urllib.request

import pytest
from conftest import start_server, stop_server
from gunicorn.config import Config
from gunicorn.http.errors import NoMoreData
from gunicorn.http.parser import RequestParser

from gunicorn_worker import Head, HeadLimits

# Guard against a hang only: nothing here waits for so long when the server is right.
GUARD = 30
HEAD_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gunicorn as the Procfile starts it, with a short head timeout to keep tests short."""
    server = start_server(tmp_path_factory.mktemp("layer"),
                          {"GUNICORN_HEAD_TIMEOUT": str(HEAD_TIMEOUT)})
    server.headers = server.account("alice")
    yield server
    stop_server(server)


class Conn:
    """A raw connection to the server that reads its answers one at a time."""

    def __init__(self, server):
        port = int(server.url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
        self.received = b""  # read from the socket, not yet taken as an answer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data):
        """Send data; an answer may come (and the server stop reading) before it is all
        sent."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def _receive(self):
        piece = self.sock.recv(65536)
        self.received += piece
        return piece

    def answer(self):
        """(status, headers as a lower-cased dict, body) of the next answer."""
        while b"\r\n\r\n" not in self.received:
            assert self._receive(), f"closed without an answer after {self.received!r}"
        head, _, rest = self.received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", 0))
        self.received = rest
        while len(self.received) < length and self._receive():
            pass
        body, self.received = self.received[:length], self.received[length:]
        return int(lines[0].split()[1]), headers, body

    def until_closed(self):
        """Everything still coming until the server closes the connection (a reset
        counts as a close)."""
        with contextlib.suppress(ConnectionResetError):
            while self._receive():
                pass
        return self.received


def assert_json_error(status, headers, body, expected):
    assert status == expected
    assert headers["content-type"] == "application/json"
    assert b"<" not in body
    assert isinstance(json.loads(body)["message"], str)


def call(server, method, path, data=None, headers=None):
    """(status, headers, body) of a request through urllib."""
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={**server.headers, **(headers or {})})
    with urllib.request.urlopen(request, timeout=GUARD) as response:
        return response.status, response.headers, response.read()


def upload_and_download(server, name, image):
    """Upload image and download it back: the bytes that came back."""
    status, _, body = call(server, "POST", f"/images?name={name}", image)
    assert status == 201
    created = json.loads(body)
    status, _, data = call(server, "GET", f"/images/{created['id']}",
                           headers={"Accept": "application/octet-stream"})
    assert status == 200
    return data


class Trickle:
    """Connections that send a request head one byte every half second, in a thread."""

    def __init__(self, server, count):
        self.conns = [Conn(server) for _ in range(count)]
        for conn in self.conns:
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sending = [conn.sock for conn in self.conns]
        while sending and not self.stopped.wait(0.5):
            for sock in list(sending):
                try:
                    sock.send(b"a")
                except OSError:
                    sending.remove(sock)  # the server closed it

    def stop(self):
        self.stopped.set()
        self.thread.join()
        for conn in self.conns:
            conn.sock.close()


def test_silent_and_slow_head_connections_do_not_stall_the_service(server, qcow2_bytes):
    """300 connections that send nothing and 50 that send their head a byte at a time:
    gunicorn used to give each a thread (the slow ones for as long as they liked) and a
    connection slot, and /healthz waited behind them."""
    silent = [Conn(server) for _ in range(300)]
    slow = Trickle(server, 50)
    try:
        assert call(server, "GET", "/healthz")[0] == 200
        assert upload_and_download(server, "busy", qcow2_bytes) == qcow2_bytes
        assert call(server, "GET", "/healthz")[0] == 200
        # Then the server closes them all, after the head timeout.
        for conn in silent:
            assert conn.until_closed() == b""
        for conn in slow.conns:
            answer = conn.until_closed()
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
    finally:
        slow.stop()
        for conn in silent:
            conn.sock.close()


def test_a_head_that_stops_halfway_gets_408_json(server):
    with Conn(server) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = conn.answer()
        assert_json_error(status, headers, body, 408)
        assert conn.until_closed() == b""


def test_the_next_head_on_a_kept_alive_connection_has_a_deadline_too(server):
    """The first request is answered; the second head, sent only in part, is cut off."""
    with Conn(server) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.answer()[0] == 200
        conn.send(b"GET /healthz HTTP/1.1\r\n")
        assert conn.answer()[0] == 408


def test_a_partial_head_read_ahead_behind_a_request_has_a_deadline_too(server):
    """The second head comes in the same packet as the first request, unfinished."""
    with Conn(server) as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        assert conn.answer()[0] == 200
        assert conn.answer()[0] == 408


def test_heads_in_pieces_pipelined_and_kept_alive_are_served(server):
    """Reading heads in the worker's main loop keeps what HTTP/1.1 allows working."""
    with Conn(server) as conn:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (b"GET /heal", b"thz HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            conn.send(piece)
            time.sleep(0.1)  # pacing, so that the pieces arrive apart
        assert conn.answer()[0] == 200
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        assert [conn.answer()[0] for _ in range(3)] == [200, 200, 200]
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert conn.answer()[0] == 200
        assert conn.until_closed() == b""


def parser_needs_more(cfg, data):
    """Whether gunicorn's parser, given data, would read more before it answers."""
    try:
        next(RequestParser(cfg, [bytes(data)], ("127.0.0.1", 1)))
    except (NoMoreData, StopIteration):
        return True
    except Exception:  # noqa: BLE001 - refused at once: it needs nothing more
        return False
    return False


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /images HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\nA: b\r\n\r\n",
    b"GET /" + b"a" * 30 + b" HTTP/1.1\r\n\r\n",
    b"\r\n\r\n",
])
def test_the_head_reader_hands_over_when_gunicorns_parser_can_answer(request_bytes):
    """Fed a byte at a time, the worker's head reader says "complete" exactly where
    gunicorn's parser stops needing more. (Not covered: a malformed request line, which
    the parser refuses as soon as the line ends; the worker hands it over with the whole
    head, and the answer is the same 400.)"""
    cfg = Config()
    cfg.set("limit_request_line", 20)
    cfg.set("http_parser", "python")
    head = Head(HeadLimits(cfg))
    for end in range(1, len(request_bytes) + 1):
        complete = head.add(request_bytes[end - 1:end])
        assert complete == (not parser_needs_more(cfg, request_bytes[:end])), end


BIG_HEADER = b"X-Big: " + b"a" * 8000 + b"\r\n"


@pytest.mark.parametrize(("request_bytes", "status"), [
    pytest.param(b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Length: 12ab\r\n\r\n", 400,
                 id="bad-content-length"),
    pytest.param(b"POST /images HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
                 id="content-length-and-transfer-encoding"),
    pytest.param(b"POST /images HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: zip\r\n\r\n", 501,
                 id="unknown-transfer-coding"),
    pytest.param(b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="bad-method"),
    pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", 400, id="bare-lf"),
    pytest.param(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
                 id="request-line-too-long"),
    pytest.param(b"GET /" + b"a" * 5000, 414, id="request-line-too-long-unfinished"),
    pytest.param(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
                 id="header-too-large"),
    pytest.param(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431,
                 id="too-many-headers"),
    pytest.param(b"GET / HTTP/1.1\r\n" + BIG_HEADER * 110, 431, id="head-too-large-unfinished"),
])
def test_gunicorn_errors_are_json(server, request_bytes, status):
    """gunicorn answers what it cannot parse itself; it used to send an HTML page."""
    with Conn(server) as conn:
        conn.send(request_bytes)
        assert_json_error(*conn.answer(), status)


def test_proxy_headers_are_ignored_unless_turned_on(server, qcow2_bytes):
    """gunicorn honoured X-Forwarded-Proto (and SCRIPT_NAME) from 127.0.0.1 whatever
    TRUST_PROXY_HEADERS said."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "on",
                 "X-Forwarded-Host": "evil.example", "SCRIPT_NAME": "/evil"}
    status, headers, body = call(server, "POST", "/images?name=plain", qcow2_bytes,
                                 headers=forwarded)
    assert status == 201
    url = json.loads(body)["url"]
    assert url.startswith(f"{server.url}/images/")
    assert headers["Location"] == url
    _, _, body = call(server, "GET", url.removeprefix(server.url), headers=forwarded)
    assert json.loads(body)["url"] == url


def test_proxy_headers_count_when_turned_on(tmp_path, qcow2_bytes):
    proxied = start_server(tmp_path / "proxied", {"TRUST_PROXY_HEADERS": "1"})
    try:
        proxied.headers = proxied.account("alice")
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"}
        status, headers, body = call(proxied, "POST", "/images?name=behind", qcow2_bytes,
                                     headers=forwarded)
        assert status == 201
        url = json.loads(body)["url"]
        assert url.startswith("https://images.example.com/images/")
        assert headers["Location"] == url
    finally:
        stop_server(proxied)
