"""Serving an image file like a static file server: types, ranges, conditions, sendfile.

The rules follow RFC 9110: preconditions in the order of section 13.2.2, single
byte ranges (14.1.2), If-Range with strong comparison (13.1.5), and Range only on
GET (14.2). The file itself goes to the server's wsgi.file_wrapper, which gunicorn
turns into sendfile(2): no byte of it passes through Python.

Why this is written here and not left to Werkzeug's Response.make_conditional:
- For a range, Werkzeug swaps the server's file wrapper for its own _RangeWrapper, a
  Python iterator; gunicorn no longer sees a file and copies every byte through Python
  instead of sendfile.
- Werkzeug answers 416 to a Range it cannot use, where RFC 9110 14.2 says a server
  must ignore an unknown unit ("items=0-5") and may ignore an invalid range
  ("bytes=5-2"): this module ignores both, and several ranges, and sends the whole
  file with 200. Werkzeug also sends 206 with the whole file for "bytes=-0", a
  zero-length suffix, which RFC 9110 14.1.1 calls unsatisfiable: 416 here.
"""

import ipaddress
import re
import socket

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import http_date, parse_accept_header, parse_date, parse_etags
from werkzeug.wrappers import Response
from werkzeug.wsgi import wrap_file

from errors import ApiError, not_found

JSON = "application/json"
DISK_TYPES = ("application/x-qemu-disk", "application/octet-stream")

# One range, as RFC 9110 14.1.2 writes it: first-pos "-" [last-pos], or "-" suffix-length.
_SINGLE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# Past this many digits a position is beyond any file; int() of thousands of digits would raise.
_MAX_DIGITS = 18
# Where sendfile cannot be used, Python reads in pieces this big (8 KiB costs 5x the CPU).
READ_SIZE = 1 << 20
# Linux's TCP_CORK and TCP_NOTSENT_LOWAT (None elsewhere): see FileSpan.
TCP_CORK = getattr(socket, "TCP_CORK", None)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)
# The most of a file that may wait unsent in the socket of a client on this host while it
# goes out (docs/downloads.md, "Unsent bytes"): with 32 KiB curl downloaded a fifth faster.
UNSENT_LIMIT = 32 * 1024


def negotiate(accept_header):
    """Pick JSON or a disk type from an Accept header; None when it allows neither.

    No header, or */*, means JSON: it is listed first, and werkzeug keeps the
    server's order among equally good matches; a more specific range wins a tie,
    and q=0 excludes a type even when a wildcard would allow it. Media type
    parameters other than q are ignored, so `application/json; charset=utf-8`
    still asks for JSON.
    """
    if not accept_header or not accept_header.strip():
        return JSON
    ranges = [(value.split(";", 1)[0].strip(), q)
              for value, q in parse_accept_header(accept_header)]
    return MIMEAccept(ranges).best_match((JSON, *DISK_TYPES))


def _position(digits):
    """A byte position from the header; huge ones are capped (they are past any file)."""
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range(header, size):
    """The (start, end) that one byte range asks for, end exclusive; None for the whole file.

    A malformed Range, another unit, or several ranges are ignored (the whole
    file), as RFC 9110 allows. A range that starts at or past the end, or a
    zero-length suffix, is unsatisfiable: 416 with `Content-Range: bytes */size`.
    """
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        start = _position(first)
        if last and _position(last) < start:
            return None
        end = min(_position(last) + 1, size) if last else size
    else:
        start, end = max(size - _position(last), 0), size
    if start >= end:
        raise ApiError(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


def if_range_matches(value, etag, last_modified):
    """Whether If-Range names the current file: the same strong ETag, or exactly its date."""
    value = value.strip()
    if value.startswith('"'):
        return value == f'"{etag}"'
    if value.startswith("W/"):
        return False  # If-Range compares strongly, so a weak tag never matches
    return parse_date(value) == last_modified


def precondition(headers, etag, last_modified):
    """RFC 9110 13.2.2 steps 1-4 for GET/HEAD: 412 or 304 when one applies, else None."""
    if "If-Match" in headers:
        if not parse_etags(headers["If-Match"]).contains(etag):  # strong comparison
            return 412
    elif "If-Unmodified-Since" in headers:
        date = parse_date(headers["If-Unmodified-Since"])
        if date is not None and last_modified > date:
            return 412
    if "If-None-Match" in headers:
        if parse_etags(headers["If-None-Match"]).contains_weak(etag):  # weak comparison
            return 304
    elif "If-Modified-Since" in headers:
        date = parse_date(headers["If-Modified-Since"])
        if date is not None and last_modified <= date:
            return 304
    return None


def _requested_range(request, size, etag, last_modified):
    """The range to send, or None for the whole file (RFC 9110 13.2.2 step 5, 14.2)."""
    if request.method != "GET" or "Range" not in request.headers:
        return None  # Range is defined for GET alone; HEAD answers as a GET without it
    if_range = request.headers.get("If-Range")
    if if_range is not None and not if_range_matches(if_range, etag, last_modified):
        return None
    return parse_range(request.headers["Range"], size)


def file_response(request, opener, *, size, mimetype, etag, last_modified, filename,
                  repr_digest=None):
    """Answer GET/HEAD with the file, through the server's file_wrapper (sendfile).

    opener() opens the file only when bytes will really be sent. A range is sent
    zero-copy too: the file is positioned at its start and Content-Length set to
    its length, which is exactly what gunicorn's sendfile path reads. repr_digest, the
    file's Repr-Digest (RFC 9530), goes on 200, 206 and 304 alike: it is the digest of
    the whole file, whatever part of it is sent; a 412 or 416 (whose body is JSON) has none.
    """
    headers = {
        "ETag": f'"{etag}"',
        "Last-Modified": http_date(last_modified),
        "Accept-Ranges": "bytes",
        "Vary": "Accept",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    refusal = precondition(request.headers, etag, last_modified)
    if refusal == 412:
        raise ApiError(412, "Precondition Failed", headers)
    try:
        span = None if refusal == 304 else _requested_range(request, size, etag, last_modified)
    except ApiError as error:
        error.headers = {**headers, **error.headers}
        raise
    if repr_digest:
        headers["Repr-Digest"] = repr_digest
    if refusal == 304:
        return Response(status=304, headers=headers)
    start, end = span or (0, size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    body = [] if request.method == "HEAD" else _span(request.environ, opener, start, end)
    response = Response(body, 206 if span else 200, headers=headers, mimetype=mimetype,
                        direct_passthrough=True)
    response.content_length = end - start
    return response


class FileSpan:
    """An open file positioned at start that reads no further than end.

    fileno() and the file's position are what gunicorn's sendfile path uses (with
    Content-Length as the count); read() bounds every other path (gunicorn serving
    TLS itself, or another WSGI server), which would otherwise read on to EOF.

    sock, the client's socket where the server gives it (gunicorn.socket), is corked
    from the server's first use of the span until close: the head and the file then
    leave in full segments, as nginx's `tcp_nopush` sends them, and a download from the
    page cache went from 0.76 to about 1.0 of nginx's rate (docs/downloads.md). For as
    long, if the client is on this host, at most UNSENT_LIMIT of the file waits in the
    socket unsent (see is_local_peer).
    """

    def __init__(self, file, start, end, sock=None):
        file.seek(start)
        self.file = file
        self.left = end - start
        self.sock = sock
        self.prepared = False
        self.corked = False
        self.limited = False

    def fileno(self):
        """The real descriptor, so that the server can sendfile from it."""
        self._prepare_socket()
        return self.file.fileno()

    def _prepare_socket(self):
        """Cork the client's socket and limit its unsent bytes, once, before the server
        writes the answer."""
        if self.sock is None or self.prepared:
            return
        self.prepared = True  # where an option failed (a Unix socket), it fails every time
        self.corked = set_tcp_option(self.sock, TCP_CORK, 1)
        self.limited = (is_local_peer(self.sock)
                        and set_tcp_option(self.sock, TCP_NOTSENT_LOWAT, UNSENT_LIMIT))

    def read(self, size=-1):
        """Up to size bytes, never past the span's end."""
        self._prepare_socket()
        size = self.left if size < 0 else min(size, self.left)
        data = self.file.read(size)
        self.left -= len(data)
        return data

    def close(self):
        """Close the file, uncork the socket, which sends what the cork held, and give it
        back the system's limit of unsent bytes (0); the server calls this when the answer
        ends, cut off or not."""
        try:
            self.file.close()
        finally:
            if self.corked:
                self.corked = not set_tcp_option(self.sock, TCP_CORK, 0)
            if self.limited:
                self.limited = not set_tcp_option(self.sock, TCP_NOTSENT_LOWAT, 0)


def is_local_peer(sock):
    """Whether sock's client is on this host: a loopback address, or the address it reached.

    Over loopback both ends share this host's kernel: each acknowledgement of the client,
    handled on the client's core, also sent the next of the server's unsent bytes from
    there, so that core did part of the server's sending beside its own receiving, and it
    was the core that ran out. With few bytes unsent, the server's thread does its own
    sending. A client elsewhere gains nothing by that, and a fast link could idle while
    the thread wakes to refill, so its sends are left as they were.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False  # a Unix socket: a proxy's, which sends on itself
    try:
        peer, local = sock.getpeername()[0], sock.getsockname()[0]
    except OSError:  # the client has gone
        return False
    return same_host(peer, local)


def same_host(peer, local):
    """Whether a connection from address peer to address local stays on this host: peer is
    local itself or loopback (an IPv4 address mapped into IPv6, as a [::] bind sees it, too)."""
    ip = ipaddress.ip_address(peer)
    return peer == local or (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def set_tcp_option(sock, option, value):
    """Set a TCP option (TCP_CORK, TCP_NOTSENT_LOWAT) on sock; whether that was done (not
    on a Unix socket, a closed one, or off Linux, where the option is None)."""
    if option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        return False
    return True


def _span(environ, opener, start, end):
    """The file's bytes start..end, wrapped for the server's sendfile; 404 if it has gone."""
    try:
        file = opener()
    except FileNotFoundError:
        raise not_found() from None  # deleted between the lookup and now
    span = FileSpan(file, start, end, environ.get("gunicorn.socket"))
    return wrap_file(environ, span, buffer_size=READ_SIZE)
