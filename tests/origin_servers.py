"""Real HTTP servers on loopback for the import tests: http.server in a thread, answering
each path as the test says (a file, a status, a redirect, a body that stalls or never
ends), counting the requests that reach it. Optionally TLS, with a certificate that
`openssl` makes for the test.
"""

import base64
import contextlib
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WAIT = 60  # seconds: a generous deadline for what a test waits on, never a sleep


class Origin:
    """An HTTP server on 127.0.0.1 in a thread. routes maps a path to a function that
    answers the request (handler -> None); requests lists (path, headers) as they came."""

    def __init__(self, tls_context=None):
        self.routes, self.requests = {}, []
        self.release = threading.Event()  # set at close: stalled answers end
        self.done = threading.Event()  # set when an answer's function has returned
        self.sent = 0  # body bytes that the endless and garbage bodies got written
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                origin.requests.append((self.path, dict(self.headers)))
                route = origin.routes.get(self.path.split("?")[0], not_found)
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client went away: what a refused import does
                finally:
                    self.close_connection = True
                    origin.done.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path, host="127.0.0.1", scheme="http", userinfo=""):
        return f"{scheme}://{userinfo}{host}:{self.port}{path}"

    def hits(self, path):
        """How many requests for path reached this server."""
        return sum(1 for seen, _ in self.requests if seen.split("?")[0] == path)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def origin_server(tls_context=None):
    """An Origin for the block."""
    origin = Origin(tls_context)
    try:
        yield origin
    finally:
        origin.close()


def not_found(handler):
    answer(handler, b"no such file", status=404)


def answer(handler, body, status=200, length=True, headers=None):
    """Answer with body, with its Content-Length or (length=False) until the connection
    closes."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def serve(body, **options):
    """A route that answers with body."""
    return lambda handler: answer(handler, body, **options)


def redirect(location, status=302):
    """A route that redirects to location."""
    return lambda handler: answer(handler, b"", status=status, headers={"Location": location})


def basic_auth(user, password, route):
    """A route that answers with route when the request carries this Basic auth, else 401."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def check(handler):
        if handler.headers.get("Authorization") == expected:
            route(handler)
        else:
            answer(handler, b"who are you?", status=401,
                   headers={"WWW-Authenticate": 'Basic realm="images"'})

    return check


def stall(origin, start=b"", length=1 << 20):
    """A route that sends its head (and start) and then nothing, until the origin closes."""

    def stalled(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        handler.wfile.write(start)
        handler.wfile.flush()
        origin.release.wait(WAIT)

    return stalled


def stream(origin, start, total=None, piece=64 * 1024):
    """A route that sends start and then zeros, total bytes in all (without end when None),
    with a Content-Length when total is given; origin.sent counts what it wrote."""

    def endless(handler):
        handler.send_response(200)
        if total is not None:
            handler.send_header("Content-Length", str(total))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(start)
        origin.sent = len(start)
        zeros = bytes(piece)
        while total is None or origin.sent < total:
            chunk = zeros[:piece if total is None else min(piece, total - origin.sent)]
            handler.wfile.write(chunk)
            origin.sent += len(chunk)

    return endless


def make_certificate(folder, host="localhost"):
    """A CA and a server certificate for host signed by it, made by openssl:
    (ca.pem, server certificate, server key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=imagestore test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    extensions = folder / "server.ext"
    extensions.write_text(f"subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    return ca, cert, key


def server_tls_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
