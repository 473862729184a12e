"""GET/HEAD /images/:id as a file: headers, ranges, conditional requests, negotiation."""

import hashlib
import os
import socket
from datetime import UTC, datetime, timedelta

import pytest
from conftest import stored_path
from hypothesis import example, given
from hypothesis import strategies as st
from werkzeug.http import http_date

from downloads import DISK_TYPES, JSON, UNSENT_LIMIT, FileSpan, negotiate, same_host
from models import Image

DISK = "application/x-qemu-disk"
OCTET = "application/octet-stream"


@pytest.fixture
def image(upload, alice):
    """alice's image go-dev, as the API shows it."""
    created = upload(alice, name="go-dev")
    assert created.status_code == 201, created.json
    return created.json


@pytest.fixture
def fetch(client, alice, image):
    """Send a request for alice's image; return the closed response and its body."""

    def send(method="GET", account=None, accept=DISK, **headers):
        sent = {**(account or alice).headers, **headers}
        if accept is not None:
            sent["Accept"] = accept
        with client.open(f"/images/{image['id']}", method=method, headers=sent) as response:
            body = response.get_data()
        return response, body

    return send


def last_modified(image):
    """The image's upload time, which is its Last-Modified."""
    return datetime.strptime(image["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def etag(image):
    """The strong ETag of the image's file: its sha256, quoted."""
    return f'"{image["sha256"]}"'


def test_full_download_has_every_header(fetch, image, qcow2_bytes):
    response, body = fetch()
    assert response.status_code == 200
    assert body == qcow2_bytes
    assert image["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()
    assert response.headers["Content-Type"] == DISK
    assert response.headers["Content-Length"] == str(len(qcow2_bytes))
    assert response.headers["Content-Disposition"] == 'attachment; filename="go-dev.qcow2"'
    assert response.headers["ETag"] == etag(image)
    assert response.headers["Last-Modified"] == http_date(last_modified(image))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "Accept" in response.vary
    assert "Content-Range" not in response.headers


def test_octet_stream_is_answered_with_that_type(fetch, qcow2_bytes):
    response, body = fetch(accept=OCTET)
    assert response.headers["Content-Type"] == OCTET
    assert body == qcow2_bytes


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=10-10", 10, 11),
        ("bytes=100-", 100, None),
        ("bytes=-100", -100, None),
        ("bytes=0-999999999999", 0, None),  # last-pos past the end is cut to the end
        ("bytes=-999999999999", 0, None),  # a suffix longer than the file is the whole file
        ("Bytes=5-9", 5, 10),  # the unit is case-insensitive
        (" bytes=5-9 ", 5, 10),
    ],
)
def test_single_range_gives_206(fetch, image, qcow2_bytes, spec, start, end):
    size = len(qcow2_bytes)
    start, end = start % size, size if end is None else end
    response, body = fetch(Range=spec)
    assert response.status_code == 206
    assert body == qcow2_bytes[start:end]
    assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
    assert response.headers["Content-Length"] == str(end - start)
    assert response.headers["Content-Type"] == DISK
    assert response.headers["ETag"] == etag(image)
    assert "Accept" in response.vary


@pytest.mark.parametrize("spec", ["bytes={size}-", "bytes={size}-{bigger}", "bytes=-0",
                                  "bytes=99999999999999999999999999999999-"])
def test_unsatisfiable_range_gives_416(fetch, image, qcow2_bytes, spec):
    size = len(qcow2_bytes)
    response, _ = fetch(Range=spec.format(size=size, bigger=size + 10))
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"
    assert response.headers["Content-Type"] == "application/json"
    assert response.json == {"message": "Range Not Satisfiable"}
    assert response.headers["ETag"] == etag(image)


@pytest.mark.parametrize("spec", [
    "bytes=0-1,5-6",  # several ranges: the whole file, as RFC 9110 allows
    "bytes=0-1, 3-4",
    "bytes=5-3",  # last-pos before first-pos is invalid
    "bytes=abc",
    "bytes=-",
    "bytes=1-2-3",
    "bytes 0-5",
    "items=0-5",  # another unit
    "bytes=٣-٤",  # digits, but not ASCII ones
])
def test_multi_or_malformed_range_gives_whole_file(fetch, qcow2_bytes, spec):
    response, body = fetch(Range=spec)
    assert response.status_code == 200
    assert body == qcow2_bytes
    assert "Content-Range" not in response.headers


@pytest.mark.parametrize("tags", ['"{sha}"', 'W/"{sha}"', "*", '"other", "{sha}"',
                                  'W/"x", W/"{sha}"'])
def test_if_none_match_that_matches_gives_304(fetch, image, tags):
    response, body = fetch(**{"If-None-Match": tags.format(sha=image["sha256"])})
    assert response.status_code == 304
    assert body == b""
    assert response.headers["ETag"] == etag(image)
    assert "Accept" in response.vary


def test_if_none_match_that_differs_gives_the_file(fetch, qcow2_bytes):
    response, body = fetch(**{"If-None-Match": '"other", W/"another"'})
    assert response.status_code == 200
    assert body == qcow2_bytes


def test_if_none_match_wins_over_if_modified_since(fetch, image, qcow2_bytes):
    later = http_date(last_modified(image) + timedelta(days=1))
    response, body = fetch(**{"If-None-Match": '"other"', "If-Modified-Since": later})
    assert response.status_code == 200
    assert body == qcow2_bytes


@pytest.mark.parametrize(("shift", "status"), [(0, 304), (3600, 304), (-1, 200)])
def test_if_modified_since(fetch, image, shift, status):
    date = http_date(last_modified(image) + timedelta(seconds=shift))
    response, body = fetch(**{"If-Modified-Since": date})
    assert response.status_code == status
    assert (body == b"") == (status == 304)


def test_if_modified_since_that_is_not_a_date_is_ignored(fetch, qcow2_bytes):
    response, body = fetch(**{"If-Modified-Since": "yesterday"})
    assert response.status_code == 200
    assert body == qcow2_bytes


@pytest.mark.parametrize("validator", ["etag", "date"])
def test_if_range_that_matches_gives_206(fetch, image, qcow2_bytes, validator):
    value = etag(image) if validator == "etag" else http_date(last_modified(image))
    response, body = fetch(Range="bytes=0-9", **{"If-Range": value})
    assert response.status_code == 206
    assert body == qcow2_bytes[:10]


@pytest.mark.parametrize("value", [
    '"other"',
    'W/"{sha}"',  # If-Range compares strongly: a weak tag never matches
    "{stale}",  # a date other than Last-Modified means the file may have changed
    "not a validator",
])
def test_if_range_that_differs_gives_whole_file(fetch, image, qcow2_bytes, value):
    stale = http_date(last_modified(image) - timedelta(days=1))
    response, body = fetch(Range="bytes=0-9",
                           **{"If-Range": value.format(sha=image["sha256"], stale=stale)})
    assert response.status_code == 200
    assert body == qcow2_bytes
    assert "Content-Range" not in response.headers


@pytest.mark.parametrize("tags", ['"other"', 'W/"{sha}"'])
def test_if_match_that_fails_gives_412(fetch, image, tags):
    response, _ = fetch(**{"If-Match": tags.format(sha=image["sha256"])})
    assert response.status_code == 412
    assert response.json == {"message": "Precondition Failed"}
    assert response.headers["ETag"] == etag(image)


@pytest.mark.parametrize("tags", ['"{sha}"', "*", '"other", "{sha}"'])
def test_if_match_that_holds_gives_the_file(fetch, image, qcow2_bytes, tags):
    response, body = fetch(**{"If-Match": tags.format(sha=image["sha256"])})
    assert response.status_code == 200
    assert body == qcow2_bytes


def test_if_match_then_if_none_match_gives_304(fetch, image):
    response, _ = fetch(**{"If-Match": etag(image), "If-None-Match": etag(image)})
    assert response.status_code == 304


@pytest.mark.parametrize(("shift", "status"), [(-1, 412), (0, 200)])
def test_if_unmodified_since(fetch, image, shift, status):
    date = http_date(last_modified(image) + timedelta(seconds=shift))
    response, _ = fetch(**{"If-Unmodified-Since": date})
    assert response.status_code == status


def test_if_match_makes_if_unmodified_since_ignored(fetch, image):
    earlier = http_date(last_modified(image) - timedelta(days=1))
    response, _ = fetch(**{"If-Match": etag(image), "If-Unmodified-Since": earlier})
    assert response.status_code == 200


def test_head_gives_the_headers_of_get_without_body(fetch):
    got, _ = fetch()
    head, body = fetch(method="HEAD")
    assert head.status_code == 200
    assert body == b""
    for name in ("Content-Type", "Content-Length", "Content-Disposition", "ETag",
                 "Last-Modified", "Accept-Ranges", "Vary"):
        assert head.headers[name] == got.headers[name], name


def test_head_ignores_range(fetch, qcow2_bytes):
    # RFC 9110 14.2: range handling is defined for GET only.
    response, body = fetch(method="HEAD", Range="bytes=0-9")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(qcow2_bytes))
    assert body == b""


def test_head_with_if_none_match_gives_304(fetch, image):
    response, _ = fetch(method="HEAD", **{"If-None-Match": etag(image)})
    assert response.status_code == 304


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "application/json"),
    ("", "application/json"),
    ("*/*", "application/json"),
    ("application/*", "application/json"),
    ("application/json", "application/json"),
    ("application/json; charset=utf-8", "application/json"),
    ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),  # a browser
    ("application/x-qemu-disk", DISK),
    ("APPLICATION/X-QEMU-DISK", DISK),
    ("application/octet-stream", OCTET),
    ("application/json;q=0.5, application/x-qemu-disk", DISK),
    ("application/json, application/x-qemu-disk;q=0.9", "application/json"),
    ("application/x-qemu-disk, application/json", "application/json"),  # a tie: JSON
    ("*/*;q=0.1, application/octet-stream", OCTET),
    ("*/*, application/octet-stream", OCTET),  # the named type is more specific
    ("application/json;q=0, */*", DISK),  # q=0 excludes JSON though */* allows it
    ("application/json;q=0, application/octet-stream;q=0.3", OCTET),
    ("text/html", 406),
    ("image/png, text/*", 406),
    ("application/json;q=0, application/x-qemu-disk;q=0, application/octet-stream;q=0", 406),
    ("*/*;q=0", 406),
])
def test_accept_negotiation(fetch, accept, expected):
    response, _ = fetch(accept=accept)
    assert "Accept" in response.vary
    if expected == 406:
        assert response.status_code == 406
        assert response.headers["Content-Type"] == "application/json"
        assert "application/x-qemu-disk" in response.json["message"]
    else:
        assert response.status_code == 200
        assert response.mimetype == expected


media_type = st.sampled_from([JSON, *DISK_TYPES, "*/*", "application/*", "text/html",
                              "image/png", "application/x-qemu-disk+zip"])
quality = st.sampled_from(["", ";q=0", ";q=0.1", ";q=0.5", ";q=1", ";q=1.0", ";q=x", ";q=2"])
accept_header = st.lists(st.tuples(media_type, quality).map("".join), max_size=4).map(", ".join)


@given(st.one_of(st.none(), accept_header, st.text(max_size=40)))
@example("*/*")
@example("")
@example("   ")
def test_negotiation_picks_one_of_the_offers_or_none(header):
    chosen = negotiate(header)
    assert chosen is None or chosen in (JSON, *DISK_TYPES)


@pytest.mark.parametrize("header", [None, "", " ", "*/*", "application/*", "*/*;q=0.5"])
def test_no_preference_means_json(header):
    assert negotiate(header) == JSON


@given(st.sampled_from(DISK_TYPES), st.sampled_from(["", ";q=1", ";q=0.9"]))
def test_a_disk_type_asked_first_wins_over_a_weaker_json(disk, q):
    assert negotiate(f"{disk}{q}, {JSON};q=0.5") == disk


not_disk = st.sampled_from([JSON, "text/html", "image/png", "application/xml"])


@given(st.lists(st.tuples(not_disk, quality).map("".join), min_size=1, max_size=4)
       .map(", ".join))
def test_a_disk_type_is_never_chosen_when_the_client_did_not_allow_one(header):
    assert negotiate(header) in (None, JSON)


def test_json_answer_varies_on_accept(fetch, image):
    response, _ = fetch(accept="application/json")
    assert response.json["id"] == image["id"]
    assert "Accept" in response.vary
    assert "Content-Disposition" not in response.headers


def test_another_users_image_is_not_found(fetch, bob):
    response, _ = fetch(account=bob)
    assert response.status_code == 404
    assert response.json == {"message": "Not Found"}


def test_download_needs_a_token(client, image):
    response = client.get(f"/images/{image['id']}", headers={"Accept": DISK})
    assert response.status_code == 401


def test_download_of_a_file_gone_from_the_store_is_not_found(app, fetch, image):
    """A DELETE removes the row, then the file: a download that read the row just before
    finds no file. Found by reliability/run.py's load scenario as a 500."""
    (key,) = app.extensions["storage"].keys()
    assert key == Image.get_by_id(image["id"]).storage_key
    os.unlink(stored_path(app, key))
    for accept in (DISK, OCTET):
        response, _ = fetch(accept=accept)
        assert response.status_code == 404
        assert response.json == {"message": "Not Found"}


# --- the socket corked while a file goes out ---------------------------------------------------

@pytest.fixture
def served_socket():
    """The server's end of a real TCP connection on loopback, as gunicorn hands it over."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    with peer, served:
        yield served


def corked(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1


def unsent_limit(sock):
    """The socket's own TCP_NOTSENT_LOWAT; 0: the system's (unlimited by default)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)


def test_a_download_corks_the_clients_socket_until_its_answer_ends(client, alice, image,
                                                                  served_socket, qcow2_bytes):
    """The head and the file leave in full segments (nginx's tcp_nopush), with at most
    UNSENT_LIMIT waiting unsent, and the end of the answer uncorks: a socket left corked
    would hold a kept-alive client's next answer."""
    assert unsent_limit(served_socket) == 0
    with client.open(f"/images/{image['id']}", headers={**alice.headers, "Accept": DISK},
                     environ_overrides={"gunicorn.socket": served_socket},
                     buffered=False) as response:
        first = next(response.response)
        assert corked(served_socket)
        assert unsent_limit(served_socket) == UNSENT_LIMIT == 32 * 1024
        assert first + b"".join(response.response) == qcow2_bytes
    assert not corked(served_socket)
    assert unsent_limit(served_socket) == 0


def test_a_span_uncorks_when_the_server_closes_it_early(tmp_path, served_socket):
    """A download cut off after its first use (sendfile's fileno) still uncorks, and gives
    the socket back the system's limit of unsent bytes."""
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    span = FileSpan(path.open("rb"), 10, 20, served_socket)
    assert span.fileno() > 0 and corked(served_socket)
    assert unsent_limit(served_socket) == UNSENT_LIMIT
    span.close()
    assert not corked(served_socket) and span.file.closed
    assert unsent_limit(served_socket) == 0


def test_only_a_client_on_this_host_gets_the_unsent_limit():
    """The limit frees the client's core of the server's sending, which it only does when
    both ends share this host's kernel; a client elsewhere is sent to as before."""
    assert same_host("127.0.0.1", "127.0.0.1")
    assert same_host("127.0.0.2", "127.0.0.1")
    assert same_host("::1", "::1")
    assert same_host("::ffff:127.0.0.1", "::ffff:192.0.2.2")  # a [::] bind's IPv4 client
    assert same_host("192.0.2.2", "192.0.2.2")  # the host's own address goes over loopback
    assert not same_host("192.0.2.7", "192.0.2.2")
    assert not same_host("2001:db8::7", "2001:db8::2")
    assert not same_host("::ffff:192.0.2.7", "::ffff:192.0.2.2")


def test_a_span_on_a_unix_socket_or_none_sends_as_before(tmp_path):
    """Behind a proxy on a Unix socket there is no TCP to cork; nothing fails."""
    path = tmp_path / "file"
    path.write_bytes(b"0123456789")
    left, right = socket.socketpair()
    with left, right:
        for sock in (left, None):
            span = FileSpan(path.open("rb"), 2, 6, sock)
            assert span.read() == b"2345" and not span.corked and not span.limited
            span.close()
