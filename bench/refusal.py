"""The early-refusal measurement of bench/run.py: a hostile upload sent by hand.

`send_hostile` opens `POST /images` with a large Content-Length, sends a hostile head (the
first 512 bytes of a VMDK descriptor, or of a qcow2 header that names a backing file) and then
zeros from one reused buffer, so the client costs no disk and little memory whatever the
length. It stops as soon as the answer is in (or the server hangs up) and returns how long the
answer took, how many body bytes the client's kernel accepted, and how many of them the
server's kernel acknowledged (TCP_INFO's bytes_acked on the client's socket).

The acknowledged count bounds what the worker read from above: what the kernel took and the
worker did not read waits in a receive window that stays small once the worker stops reading.
The worker's /proc/PID/io would not do: its rchar counts read(2) but not recv(2), which is how
gunicorn reads a socket.
"""

import json
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
HEAD_SIZE = 512
POLL_SECONDS = 0.1  # how often a blocked send looks whether the answer came in the meantime
VMDK_DESCRIPTOR = (
    b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
    b'createType="monolithicFlat"\n\n# Extent description\nRW 8388608 FLAT "/etc/shadow" 0\n')


def hostile_heads(work):
    """{kind: its first 512 bytes}: a VMDK descriptor naming /etc/shadow, and a qcow2 header
    (made by qemu-img) whose backing file is a metadata URL."""
    qcow2 = Path(work) / "backing.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                    "http://169.254.169.254/latest/meta-data", str(qcow2), "4G"], check=True)
    head = qcow2.read_bytes()[:HEAD_SIZE]
    qcow2.unlink()
    return {"VMDK descriptor": VMDK_DESCRIPTOR.ljust(HEAD_SIZE, b"\0"),
            "qcow2 with backing file": head}


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64, sits at byte 120.
TCP_INFO_SIZE, BYTES_ACKED_AT = 232, 120


@dataclass
class Refusal:
    """What one hostile upload gave: status (None: the server hung up without answering),
    seconds from the request's first byte to the answer's head, body bytes the client's
    kernel took, body bytes the server's kernel acknowledged, the answer's message."""

    status: int | None
    seconds: float
    client_sent: int
    server_took: int
    message: str


def bytes_acked(sock):
    """Bytes of this connection the peer's kernel has acknowledged (also once it is closed)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    return struct.unpack_from("=Q", info, BYTES_ACKED_AT)[0]


class Answer:
    """Reads the HTTP answer on a socket in a thread of its own, while the body is sent."""

    def __init__(self, sock):
        self.sock, self.data, self.error = sock, b"", None
        self.head_at = None  # perf_counter when the status line and headers were in
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while not self._complete():
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                self.data += chunk
                if self.head_at is None and b"\r\n\r\n" in self.data:
                    self.head_at = time.perf_counter()
        except OSError as error:  # a reset: the server hung up, maybe before answering
            self.error = error
        finally:
            self.done.set()

    def _complete(self):
        """True once the head and a body of its Content-Length are in."""
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return len(body) >= int(value)
        return False

    def status_and_message(self):
        """The status code and the JSON message (or the error) of the answer."""
        if self.head_at is None:
            return None, f"no answer ({self.error or 'connection closed'})"
        head, _, body = self.data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        try:
            return status, str(json.loads(body).get("message", body[:200]))
        except ValueError:
            return status, body[:200].decode(errors="replace")


def request_head(url, token, length):
    """The request line and headers of the hostile POST /images."""
    host = url.split("//", 1)[1]
    return (f"POST /images?name=hostile HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def send_body(sock, head, length, answer, deadline):
    """Send head, then zeros, up to length bytes or until the answer is in or the server
    hangs up; return the bytes the kernel accepted."""
    buffer = bytearray(MiB)
    buffer[:len(head)] = head
    view, sent = memoryview(buffer), 0
    while sent < length and not answer.done.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"hostile upload: no answer after {sent} bytes sent")
        offset = sent % MiB
        piece = view[offset:min(MiB, offset + length - sent)]
        try:
            sent += sock.send(piece)
        except TimeoutError:
            continue  # the server stopped reading: look again whether it answered
        except (BrokenPipeError, ConnectionResetError):
            break
        if sent >= MiB and buffer[0]:
            buffer[:len(head)] = bytes(len(head))  # the head goes first only
    return sent


def send_hostile(url, token, head, length, timeout):
    """One hostile upload of length bytes: the Refusal it got."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    request = request_head(url, token, length)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock.settimeout(POLL_SECONDS)
        answer = Answer(sock)
        start = time.perf_counter()
        sock.sendall(request)
        sent = send_body(sock, head, length, answer, time.monotonic() + timeout)
        if not answer.done.wait(timeout):
            raise RuntimeError(f"hostile upload: no answer in {timeout} s")
        took = bytes_acked(sock) - len(request)
    finally:
        sock.close()
    status, message = answer.status_and_message()
    seconds = (answer.head_at or time.perf_counter()) - start
    return Refusal(status, seconds, sent, took, message)
