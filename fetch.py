"""The HTTP client of imports from a URL: the address guard, and one guarded GET.

A host is resolved here, every address it has is checked against the guard (loopback,
private, link-local, multicast, reserved and unspecified addresses are refused unless the
operator allows them), and the connection goes to an address that was checked: a name that
would resolve to another address a moment later (DNS rebinding) cannot send the request
elsewhere. TLS still verifies the certificate against the host name (SNI and the Host
header carry the name, only the socket is pinned). Every redirect is checked the same way.
Nothing here ever puts a password into a message. docs/imports.md says why each rule is.
"""

import base64
import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from urllib.parse import quote, unquote, urljoin, urlsplit

MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Printable ASCII but the space stays as it is in a request target; anything else (what an
# IRI-style Location or URL may hold) is percent-encoded, as a browser sends it.
_TARGET_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))
# The kinds of address refused, in the order a refusal names them (127.0.0.1 is private
# too for Python; "loopback" says more).
_REFUSED_KINDS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052's NAT64): a
# gateway would forward to that address, so it is checked as the address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A URL's scheme and "//", then its authority (user info and host), as RFC 3986 splits them.
_AUTHORITY = re.compile(r"([^:/?#]+://)([^/?#]*)")


CUT_OFF = "cut off: the server closed the connection before the end of the body"


class FetchError(Exception):
    """Why a fetch failed, as download.error shows it; never holds a password."""


class UrlRefused(FetchError):
    """A URL refused by its form alone; str() completes 'Download URL …' (a POST's 400)."""


@dataclass(frozen=True)
class Target:
    """A URL checked for form: where to connect and what to ask for (no user info)."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # the request target: path and query, percent-encoded ASCII

    @property
    def origin(self):
        return self.scheme, self.host, self.port


@dataclass(frozen=True)
class Guard:
    """Which addresses imports may reach (DOWNLOAD_ALLOW_PRIVATE, DOWNLOAD_ALLOW_HOSTS)."""

    allow_private: bool = False
    allow_hosts: frozenset = frozenset()

    def check(self, host, address):
        """Raise FetchError when the guard refuses host's address (text, as resolved)."""
        if self.allow_private or host.lower() in self.allow_hosts:
            return
        kind = refused_kind(address)
        if kind is not None:
            named = host if host == address else f"{host} ({address})"
            raise FetchError(f"address not allowed: {named} is a {kind} address")


@dataclass(frozen=True)
class Limits:
    """The timeouts of a fetch, in seconds. (TLS trusts the system's CAs, or those of
    OpenSSL's SSL_CERT_FILE and SSL_CERT_DIR when set.)"""

    connect_timeout: float = 10
    stall_timeout: float = 60


def refused_kind(text):
    """The kind of a refused address ("loopback", "private", ...), None for a public one."""
    address = ipaddress.ip_address(text)
    if address.version == 6:
        if address.ipv4_mapped or address.sixtofour:
            address = address.ipv4_mapped or address.sixtofour
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    kind = next((k for k in _REFUSED_KINDS if getattr(address, f"is_{k}")), None)
    if kind is None and not address.is_global:
        kind = "non-public"  # shared (100.64/10) and the other special-purpose blocks
    return kind and kind.replace("_", "-")


def parse_url(url):
    """The Target of an http or https URL; UrlRefused says what is wrong with its form."""
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c.isspace() for c in url):
        raise UrlRefused("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:  # a bad [IPv6] or a port that is no number up to 65535
        raise UrlRefused(f"is not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused("must be http or https")
    if not parts.hostname:
        raise UrlRefused("must name a host")
    if port == 0:
        raise UrlRefused("is not a valid URL: port 0")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, parts.hostname, port or DEFAULT_PORTS[scheme],
                  quote(target, safe=_TARGET_SAFE))


def without_password(url, keep_user=True):
    """url exactly as given but for the password in its user info (the user name too,
    unless keep_user): what download.source, errors and logs may show. Read from the text
    itself, so that a URL that does not parse loses its password all the same."""
    match = _AUTHORITY.match(url)
    if match is None or "@" not in match.group(2):
        return url
    userinfo, _, host = match.group(2).rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if keep_user and not colon:
        return url
    kept = f"{user}@" if keep_user else ""
    return match.group(1) + kept + host + url[match.end():]


def url_credentials(url):
    """(user, password) of a URL's user info, percent-decoded; None without one. A user
    without a password has an empty one (as curl sends it)."""
    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def literal_address(host):
    """host itself when it is an IP literal (nothing to resolve), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def check_literal(target, guard):
    """Refuse a URL whose host is an IP literal the guard refuses (before any fetch)."""
    address = literal_address(target.host)
    if address is not None:
        guard.check(target.host, address)


def resolve(target, guard, resolver=socket.getaddrinfo):
    """The socket addresses of target's host, each one allowed by the guard; FetchError
    when the name does not resolve or any of its addresses is refused."""
    try:
        infos = resolver(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise FetchError(f"could not resolve host {target.host}: {reason}") from None
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))
    for _, sockaddr in addresses:
        guard.check(target.host, sockaddr[0].split("%")[0])  # a link-local's %zone
    if not addresses:
        raise FetchError(f"could not resolve host {target.host}: no address")
    return addresses


def connect_pinned(addresses, timeout, name):
    """A socket connected to the first of the checked addresses that answers."""
    failure = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except TimeoutError:
            failure = f"timed out connecting to {name} ({timeout:g} s)"
        except OSError as error:
            failure = f"could not connect to {name}: {error.strerror or error}"
        sock.close()
    raise FetchError(failure)


def _connection(target, addresses, limits):
    """An unopened http.client connection to target whose socket goes to a checked
    address: the Host header and TLS's server name stay the URL's host name."""
    if target.scheme == "https":
        connection = http.client.HTTPSConnection(target.host, target.port,
                                                 timeout=limits.stall_timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(target.host, target.port,
                                                timeout=limits.stall_timeout)
    # http.client opens its socket through this attribute (set by its __init__), by name;
    # here it connects to the checked addresses instead.
    connection._create_connection = partial(_pinned_socket, addresses, limits,
                                            f"{target.host}:{target.port}")
    return connection


def _pinned_socket(addresses, limits, name, address, timeout, source_address=None):
    """connect_pinned for http.client; then each read may wait the stall timeout."""
    sock = connect_pinned(addresses, limits.connect_timeout, name)
    sock.settimeout(timeout)
    return sock


def _headers(credentials):
    """The request's headers; Basic auth from the URL's user and password, if it had any."""
    headers = {"User-Agent": "imagestore", "Accept": "*/*"}
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return headers


def _failure(error, host, limits):
    """The FetchError for what went wrong while talking to host (no password is in any)."""
    if isinstance(error, FetchError):
        return error
    if isinstance(error, ssl.SSLCertVerificationError):
        return FetchError(f"TLS certificate of {host} not accepted: {error.verify_message}")
    if isinstance(error, ssl.SSLError):
        return FetchError(f"TLS failed with {host}: {error.reason or error}")
    if isinstance(error, TimeoutError):
        return FetchError(f"timed out: {host} sent nothing for {limits.stall_timeout:g} s")
    if isinstance(error, http.client.HTTPException):
        return FetchError(f"{host} did not answer in HTTP: {type(error).__name__}")
    return FetchError(f"connection to {host} failed: {error.strerror or error}")


def _ask(target, credentials, guard, limits, resolver):
    """Send the GET to target; return (connection, response) once the answer's head is in."""
    connection = _connection(target, resolve(target, guard, resolver), limits)
    try:
        connection.request("GET", target.path, headers=_headers(credentials))
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException, UnicodeError, FetchError) as error:
        connection.close()
        raise _failure(error, target.host, limits) from None


def _status_text(response):
    """'404 Not Found': the status and its standard phrase (else the server's, cut short)."""
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "".join(c for c in response.reason if c.isprintable())[:80]
    return f"{response.status} {phrase}".rstrip()


def _redirect(url, location):
    """The URL and Target that a redirect's Location names, resolved against url."""
    url = urljoin(url, location)
    try:
        return url, parse_url(url)
    except UrlRefused as refused:
        shown = without_password(url, keep_user=False)[:200]
        raise FetchError(f"redirect refused: the URL {refused} ({shown})") from None


class Download:
    """The body of a 2xx answer, to read with readinto; errors become FetchError."""

    def __init__(self, connection, response, limits, host):
        self._connection, self._response = connection, response
        self._limits, self._host = limits, host
        self.length = response.length  # Content-Length, None when chunked or unsaid

    def readinto(self, view):
        try:
            return self._response.readinto(view)
        except http.client.IncompleteRead:  # a chunked body that ended before its last chunk
            raise FetchError(CUT_OFF) from None
        except (OSError, http.client.HTTPException) as error:
            raise _failure(error, self._host, self._limits) from None

    def close(self):
        self._connection.close()

    def abort(self):
        """End the transfer from another thread: a read blocked on the socket returns at
        once (with what came, or an error)."""
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: the transfer is over
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_url(url, credentials, guard, limits, resolver=socket.getaddrinfo):
    """GET url, following at most MAX_REDIRECTS redirects (each one checked); the Download
    of the 2xx answer, or FetchError. Basic auth (credentials: (user, password) or None)
    goes to the URL's own scheme, host and port only; a URL's user info is never sent."""
    target = parse_url(url)
    origin = target.origin
    for _ in range(MAX_REDIRECTS + 1):
        auth = credentials if target.origin == origin else None
        connection, response = _ask(target, auth, guard, limits, resolver)
        location = response.getheader("Location")
        if response.status not in REDIRECT_STATUSES or not location:
            break
        connection.close()
        url, target = _redirect(url, location)
    else:
        raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})")
    if not 200 <= response.status < 300:
        connection.close()
        raise FetchError(f"HTTP {_status_text(response)}")
    return Download(connection, response, limits, target.host)
