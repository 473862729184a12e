"""An HTTP proxy on loopback for the client's tests: it passes each request on to a server,
one request a connection, records what went through (method, path, headers, status, body
bytes each way), and lets a test break the traffic: cut a connection after so many bytes,
change a byte, or hold an answer until the test lets it go.

A hook is a function (exchange, block, position) -> block, called for each block of a body
on its way (on_request_body: client to server, on_response_body: server to client; position:
the body's bytes passed on before this block); it returns what to pass on, or raises
Cut(what to pass on first) to close both sides there, as a dropped link would.
"""

import contextlib
import socket
import threading
from dataclasses import dataclass, field

BLOCK = 64 * 1024
DEADLINE = 60  # seconds a test's condition is waited for before the test fails


class Cut(Exception):
    """Raised by a hook: pass `forward` on, then close both connections; with linger, the
    client's at once and the server's once linger() returns (a link that drops is seen by
    one side first)."""

    def __init__(self, forward=b"", linger=None):
        super().__init__("cut")
        self.forward, self.linger = forward, linger


@dataclass
class Exchange:
    """One request through the proxy and its answer, as far as they got."""

    method: str
    path: str
    request_headers: dict
    status: int | None = None
    response_headers: dict = field(default_factory=dict)
    sent: int = 0  # request body bytes passed to the server
    received: int = 0  # answer body bytes passed to the client
    cut: bool = False
    done: bool = False

    @property
    def is_file(self):
        """Whether the answer is an image file (200 or 206 with a disk type)."""
        return self.status in (200, 206) and self.response_headers.get(
            "content-type", "").startswith(("application/x-qemu-disk", "application/octet"))


def parse_head(head):
    """(first line's words, headers with lower-case names) of an HTTP head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].split(" ", 2), headers


def read_head(sock):
    """(head, bytes after it) read from a socket; (b"", b"") when it closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        block = sock.recv(BLOCK)
        if not block:
            return b"", b""
        data += block
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def closing_head(head):
    """The request head with `Connection: close`, so that each connection carries one."""
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


class LoopbackProxy:
    """The proxy, listening on 127.0.0.1 (url) and passing requests to target_port."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.exchanges = []
        self.on_request_body = self.on_response_body = None
        self.changed = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def close(self):
        """Stop listening (shutdown wakes the accept, which close alone does not)."""
        hang_up(self.listener)
        self.listener.close()
        self.thread.join(DEADLINE)

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by close()
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def wait_for(self, condition, deadline=DEADLINE):
        """Wait until condition(exchanges) holds (checked as exchanges change); fail if not."""
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self.exchanges), deadline):
                raise AssertionError("the proxy did not see what the test waited for")

    def note(self, exchange, **changes):
        """Change an exchange and wake whoever waits on the exchanges."""
        with self.changed:
            for name, value in changes.items():
                setattr(exchange, name, value)
            self.changed.notify_all()

    def serve(self, client):
        """Pass one request and its answer on, then close both connections."""
        with client, socket.create_connection(("127.0.0.1", self.target_port)) as server:
            head, rest = read_head(client)
            if not head:
                return
            (method, path, _), headers = parse_head(head)
            exchange = Exchange(method, path, headers)
            with self.changed:
                self.exchanges.append(exchange)
                self.changed.notify_all()
            server.sendall(closing_head(head))
            length = int(headers.get("content-length", 0))
            upload = threading.Thread(target=self.pass_request,
                                      args=(client, server, exchange, rest, length), daemon=True)
            upload.start()
            self.pass_answer(server, client, exchange)
            upload.join(DEADLINE)
            self.note(exchange, done=True)

    def forward(self, data, to, exchange, hook, counter):
        """Pass data on through the hook (which may raise Cut), counting it."""
        try:
            data = hook(exchange, data, getattr(exchange, counter)) if hook else data
        except Cut as cut:
            to.sendall(cut.forward)
            self.note(exchange, cut=True, **{counter: getattr(exchange, counter)
                                             + len(cut.forward)})
            raise
        to.sendall(data)
        self.note(exchange, **{counter: getattr(exchange, counter) + len(data)})

    def pass_request(self, client, server, exchange, data, length):
        """The request body, `length` bytes, client to server."""
        try:
            while length > 0:
                data = data or client.recv(min(BLOCK, length))
                if not data:
                    return
                data, rest = data[:length], data[length:]
                length -= len(data)
                self.forward(data, server, exchange, self.on_request_body, "sent")
                data = rest
        except Cut as cut:
            hang_up(client)
            if cut.linger:
                cut.linger()
            hang_up(server)
        except OSError:  # the other side went away: so does this one
            return

    def pass_answer(self, server, client, exchange):
        """The answer, server to client, until the server closes."""
        try:
            head, data = read_head(server)
            if not head:
                return
            (_, status, _), headers = parse_head(head)
            self.note(exchange, status=int(status), response_headers=headers)
            client.sendall(head + b"\r\n\r\n")
            while data or (data := server.recv(BLOCK)):
                self.forward(data, client, exchange, self.on_response_body, "received")
                data = b""
        except Cut:
            hang_up(client, server)
        except OSError:
            hang_up(client, server)


def hang_up(*socks):
    """Close connections at once, both ways, as a broken link does."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def cut_once_after(count, when=lambda exchange: exchange.is_file, linger=None):
    """A hook that cuts the first exchange matching `when` after count body bytes (see Cut
    for linger)."""
    state = {"done": False}

    def hook(exchange, block, position):
        if state["done"] or not when(exchange) or position + len(block) < count:
            return block
        state["done"] = True
        raise Cut(block[:count - position], linger)

    return hook


def cut_every(count, method="PATCH"):
    """A hook that cuts the connection each time another `count` bytes of request bodies
    (of `method`, all exchanges together) have gone through."""
    state = {"total": 0, "next": count}

    def hook(exchange, block, position):
        if exchange.method != method:
            return block
        if state["total"] + len(block) < state["next"]:
            state["total"] += len(block)
            return block
        keep = state["next"] - state["total"]
        state["total"], state["next"] = state["next"], state["next"] + count
        raise Cut(block[:keep])

    return hook


def flip_byte(offset, when=lambda exchange: exchange.is_file):
    """A hook that changes one byte (at offset of the body) of each exchange matching `when`."""

    def hook(exchange, block, position):
        if when(exchange) and position <= offset < position + len(block):
            at = offset - position
            return block[:at] + bytes([block[at] ^ 0xFF]) + block[at + 1:]
        return block

    return hook
