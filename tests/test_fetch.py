"""fetch.py, the HTTP client of imports: which addresses it refuses, that it connects to the
address it checked, redirects checked at every hop, TLS verified against the host name,
timeouts, and messages without passwords. Against real servers on loopback."""

import socket

import pytest
from origin_servers import (
    basic_auth,
    make_certificate,
    origin_server,
    redirect,
    serve,
    server_tls_context,
    stall,
)

from fetch import (
    MAX_REDIRECTS,
    FetchError,
    Guard,
    Limits,
    UrlRefused,
    open_url,
    parse_url,
    refused_kind,
    url_credentials,
    without_password,
)

LOCALHOST = Guard(allow_hosts=frozenset({"localhost"}))
LIMITS = Limits(connect_timeout=10, stall_timeout=0.5)


@pytest.fixture
def origin():
    with origin_server() as server:
        yield server


def fetched(url, guard=LOCALHOST, credentials=None, limits=LIMITS, **options):
    """The body that open_url gets from url."""
    with open_url(url, credentials, guard, limits, **options) as download:
        view = memoryview(bytearray(1 << 20))
        data = b""
        while got := download.readinto(view):
            data += bytes(view[:got])
        return data


def failure(url, **options):
    """Why open_url fails on url (what download.error would say)."""
    with pytest.raises(FetchError) as failed:
        fetched(url, **options)
    return str(failed.value)


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"),  # the cloud's metadata service
    ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"),
    ("100.64.0.1", "non-public"),  # shared address space (carrier NAT)
    ("::ffff:127.0.0.1", "loopback"),  # IPv4 inside IPv6: the IPv4 address counts
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_each_kind_of_address_that_is_not_public_is_refused(address, kind):
    assert refused_kind(address) == kind


def test_a_host_resolving_to_loopback_is_refused_and_nothing_reaches_it(origin):
    origin.routes["/img"] = serve(b"data")
    with pytest.raises(FetchError) as refused:
        fetched(origin.url("/img", host="localhost"), guard=Guard())
    assert str(refused.value) == "address not allowed: localhost (127.0.0.1) is a loopback address"
    assert origin.requests == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1"])
def test_loopback_written_in_another_form_is_refused_once_resolved(origin, host):
    """What is no IP literal to Python but is one to the C library is checked as it
    resolves."""
    assert failure(origin.url("/img", host=host), guard=Guard()) == (
        f"address not allowed: {host} (127.0.0.1) is a loopback address")
    assert origin.requests == []


def test_an_allowed_host_or_private_addresses_allowed_reach_the_server(origin):
    origin.routes["/img"] = serve(b"data")
    assert fetched(origin.url("/img", host="localhost")) == b"data"
    assert fetched(origin.url("/img"), guard=Guard(allow_private=True)) == b"data"
    # localhost is allowed, not its address by itself
    assert failure(origin.url("/img")) == "address not allowed: 127.0.0.1 is a loopback address"


def test_the_connection_goes_to_the_address_that_was_checked(origin):
    """Pinned against DNS rebinding: the name is resolved once, checked, and the socket goes
    to that very address; the Host header still names the host. A client that resolved the
    name again to connect would not find images.test at all."""
    asked = []

    def resolver(host, port, **options):
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    origin.routes["/img"] = serve(b"data")
    guard = Guard(allow_hosts=frozenset({"images.test"}))
    assert fetched(origin.url("/img", host="images.test"), guard=guard,
                   resolver=resolver) == b"data"
    assert asked == ["images.test"]
    assert origin.requests[0][1]["Host"] == f"images.test:{origin.port}"


def test_a_name_with_one_refused_address_among_others_is_refused(origin):
    def resolver(host, port, **options):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in ("8.8.8.8", "10.0.0.7")]

    assert failure("http://images.test/img", guard=Guard(), resolver=resolver) == (
        "address not allowed: images.test (10.0.0.7) is a private address")


def test_a_redirect_to_a_refused_address_is_not_followed(origin):
    """The first hop is allowed (localhost), its redirect to 127.0.0.1 is not: no request
    reaches the refused address."""
    with origin_server() as private:
        private.routes["/secret"] = serve(b"metadata")
        origin.routes["/img"] = redirect(private.url("/secret"))
        with pytest.raises(FetchError) as refused:
            fetched(origin.url("/img", host="localhost"))
        assert str(refused.value) == "address not allowed: 127.0.0.1 is a loopback address"
        assert private.hits("/secret") == 0
    assert origin.hits("/img") == 1


def test_redirects_are_followed_up_to_five(origin):
    for hop in range(MAX_REDIRECTS + 1):
        origin.routes[f"/hop{hop}"] = redirect(f"/hop{hop + 1}", status=(301, 302, 307)[hop % 3])
    origin.routes[f"/hop{MAX_REDIRECTS}"] = serve(b"data")
    assert fetched(origin.url("/hop0", host="localhost")) == b"data"
    origin.routes[f"/hop{MAX_REDIRECTS}"] = redirect("/hop0")
    assert failure(origin.url("/hop0", host="localhost")) == "too many redirects (more than 5)"


def test_a_redirect_to_another_scheme_is_refused_without_its_password(origin):
    origin.routes["/img"] = redirect("ftp://user:hunter2@files.example/img.qcow2")
    with pytest.raises(FetchError) as refused:
        fetched(origin.url("/img", host="localhost"))
    assert str(refused.value) == ("redirect refused: the URL must be http or https "
                                  "(ftp://files.example/img.qcow2)")


def test_basic_auth_goes_to_the_url_own_host_only(origin):
    origin.routes["/img"] = basic_auth("alice", "s3cret", serve(b"data"))
    origin.routes["/moved"] = redirect("/img")
    origin.routes["/away"] = redirect(origin.url("/img", host="LOCALHOST"))
    credentials = ("alice", "s3cret")
    assert fetched(origin.url("/moved", host="localhost"), credentials=credentials) == b"data"
    guard = Guard(allow_private=True)  # a redirect from 127.0.0.1 to localhost: another host
    assert failure(origin.url("/away"), guard=guard,
                   credentials=credentials) == "HTTP 401 Unauthorized"
    assert "Authorization" not in origin.requests[-1][1]


def test_a_status_that_is_not_2xx_fails_naming_it(origin):
    assert failure(origin.url("/missing", host="localhost")) == "HTTP 404 Not Found"


def test_a_server_that_stops_sending_fails_after_the_stall_timeout(origin):
    origin.routes["/slow"] = stall(origin, start=b"QFI\xfb")
    assert failure(origin.url("/slow", host="localhost")) == (
        "timed out: localhost sent nothing for 0.5 s")


def test_a_server_that_never_answers_fails_after_the_stall_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        port = listener.getsockname()[1]
        assert failure(f"http://localhost:{port}/img") == (
            "timed out: localhost sent nothing for 0.5 s")


def test_a_port_where_nothing_listens_fails_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    assert failure(f"http://localhost:{port}/img") == (
        f"could not connect to localhost:{port}: Connection refused")


@pytest.fixture
def tls_origin(tmp_path, monkeypatch):
    """An HTTPS server with a certificate for localhost from a CA of the test's, which
    OpenSSL is told to trust as an operator would (SSL_CERT_FILE)."""
    ca, cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with origin_server(server_tls_context(cert, key)) as server:
        server.routes["/img"] = serve(b"data")
        yield server


def test_https_verifies_the_certificate_against_the_host_name(tls_origin):
    """The socket goes to the checked address; TLS still checks the certificate against
    the URL's host name: localhost passes, another name for the same address does not."""
    assert fetched(tls_origin.url("/img", host="localhost", scheme="https")) == b"data"

    def resolver(host, port, **options):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    guard = Guard(allow_hosts=frozenset({"images.test"}))
    assert failure(tls_origin.url("/img", host="images.test", scheme="https"), guard=guard,
                   resolver=resolver).startswith(
        "TLS certificate of images.test not accepted: Hostname mismatch")


def test_https_refuses_a_certificate_from_an_unknown_ca(tls_origin, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE")
    assert failure(tls_origin.url("/img", host="localhost", scheme="https")) == (
        "TLS certificate of localhost not accepted: unable to get local issuer certificate")


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.com/a.qcow2", "must be http or https"),
    ("file:///etc/passwd", "must be http or https"),
    ("example.com/a.qcow2", "must be http or https"),
    ("http:///a.qcow2", "must name a host"),
    ("http://example.com:99999/a", "is not a valid URL: Port out of range 0-65535"),
    ("http://example.com:0/a", "is not a valid URL: port 0"),
    ("http://[::1/a", "is not a valid URL: Invalid IPv6 URL"),
    ("http://example.com/a b", "must not contain spaces or control characters"),
    ("http://example.com/a\r\nX-Evil: 1", "must not contain spaces or control characters"),
    ("http://example.com/" + "a" * 2030, "must be at most 2048 characters"),
])
def test_a_url_of_the_wrong_form_is_refused(url, message):
    with pytest.raises(UrlRefused) as refused:
        parse_url(url)
    assert str(refused.value) == message


def test_a_url_of_2048_characters_is_accepted():
    url = "https://Example.com/" + "a" * 2028
    assert len(url) == 2048
    assert parse_url(url).host == "example.com"


def test_a_non_ascii_path_is_sent_percent_encoded():
    assert parse_url("https://example.com/images/alpine-ß.qcow2?v=1").path == \
        "/images/alpine-%C3%9F.qcow2?v=1"


@pytest.mark.parametrize(("url", "shown", "credentials"), [
    ("https://alice:s3cret@Example.com/Alpine.qcow2", "https://alice@Example.com/Alpine.qcow2",
     ("alice", "s3cret")),
    ("https://alice:p%40ss:word@host/a", "https://alice@host/a", ("alice", "p@ss:word")),
    ("https://token@host/a", "https://token@host/a", ("token", "")),
    ("HTTPS://Host/Path?Q=1", "HTTPS://Host/Path?Q=1", None),
])
def test_the_password_is_taken_out_of_the_url_and_nothing_else_changes(url, shown, credentials):
    assert without_password(url) == shown
    assert url_credentials(url) == credentials
