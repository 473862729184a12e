"""Uploads that their first bytes condemn, over a real gunicorn: answered 400 as soon as the
header is in, with the message the whole file would get, the rest of the body never read
(a 1 GiB body used to be read and written in full first), the connection closed, nothing
left on disk, and the server serving on."""

import contextlib
import json
import os
import socket
import threading
import time

import pytest
import sample_images
from conftest import read_answer, server_with_account

from qcow2 import ImageRefused, inspect_qcow2

DECLARED = 1 << 30  # what each hostile upload says it will send
PIECE = 64 * 1024
# Bytes in flight that are no sign of reading: socket buffers on loopback (a few MiB at
# most) and what the server reads before the header check and drops while closing.
FAR_BELOW = 64 << 20
HOSTILE = {
    "vmdk": lambda d: sample_images.other_format(d, "vmdk"),
    "backing": sample_images.backing_path,
    "luks": sample_images.luks_qcow2,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_with_account(tmp_path_factory.mktemp("early"), "early",
                                 {"WEB_CONCURRENCY": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{kind: (the file's first bytes, the message refusing the whole file)}."""
    made = {}
    for kind, make in HOSTILE.items():
        path = make(tmp_path_factory.mktemp(kind))
        with pytest.raises(ImageRefused) as refusal:
            inspect_qcow2(str(path), 2 << 40)
        made[kind] = path.read_bytes()[:PIECE], str(refusal.value)
    return made


class Sender(threading.Thread):
    """Sends a POST /images head and a body that starts with `start` (then zeros), on its
    own thread, until the body is all sent, the answer came, or the server hung up; counts
    the body's bytes that the kernel took."""

    def __init__(self, sock, start, chunked, slowly):
        super().__init__(daemon=True)
        self.sock, self.start_bytes, self.chunked, self.slowly = sock, start, chunked, slowly
        self.sent = 0
        self.answered = threading.Event()

    def pieces(self):
        """The body in pieces of PIECE bytes (1 KiB, in the slow way), framed if chunked."""
        size = 1024 if self.slowly else PIECE
        data, zeros = self.start_bytes.ljust(PIECE, b"\0"), bytes(size)
        for offset in range(0, DECLARED, size):
            piece = data[offset:offset + size] if offset < PIECE else zeros
            yield b"%x\r\n%s\r\n" % (size, piece) if self.chunked else piece, size
        if self.chunked:
            yield b"0\r\n\r\n", 0

    def run(self):
        with contextlib.suppress(OSError):  # the server hung up: what it did is the answer
            for framed, size in self.pieces():
                if self.answered.is_set():
                    return
                self.sock.sendall(framed)
                self.sent += size
                if self.slowly:
                    time.sleep(0.002)  # pacing, not synchronisation: a slow client


def upload_hostile(server, start, chunked=False, slowly=False):
    """Send a hostile upload declared as 1 GiB; return (status, head, body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])),
                                    timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIECE)  # few bytes in flight
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {DECLARED}"
    sock.sendall(f"POST /images?name=hostile HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: {server.headers['Authorization']}\r\n{framing}\r\n\r\n"
                 .encode())
    sender = Sender(sock, start, chunked, slowly)
    sender.start()
    try:
        status, head, body = read_answer(sock)
        sent = sender.sent
    finally:
        sender.answered.set()
        sender.join(60)
        sock.close()
    return status, head, body, sent


def staged(server):
    return os.listdir(server.instance / "images" / ".incoming")


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("slowly", [False, True], ids=["in-full", "slowly"])
def test_a_hostile_header_is_refused_before_the_body_is_read(server, hostile, kind, chunked,
                                                             slowly):
    start, message = hostile[kind]
    status, head, body, sent = upload_hostile(server, start, chunked, slowly)
    assert (status, json.loads(body)) == (400, {"file": [message]})
    assert b"\r\nconnection: close\r\n" in head.lower() + b"\r\n"
    assert sent < FAR_BELOW, f"{sent} of {DECLARED} bytes sent before the answer"
    assert staged(server) == []


def test_the_server_serves_on_after_refusals(server, hostile, qcow2_bytes):
    for kind in HOSTILE:
        assert upload_hostile(server, hostile[kind][0])[0] == 400
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])),
                                    timeout=60)
    sock.sendall(f"POST /images?name=good HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: {server.headers['Authorization']}\r\n"
                 f"Content-Length: {len(qcow2_bytes)}\r\n\r\n".encode() + qcow2_bytes)
    status, _, _ = read_answer(sock)
    sock.close()
    assert status == 201
    assert staged(server) == []
