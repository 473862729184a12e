"""Reads without a token: an image under a `public` root is read by anyone (its JSON, its
file with every download header, HEAD, its namespace's list); everything else answers 401
without a token, the same whether it exists or not. Lists of /images and every change still
need a token."""

import hashlib
import http.client
import json
import urllib.request
from urllib.parse import urlsplit

import pytest

from access import may_see, readable_image
from errors import ApiError
from models import Image
from namespaces import ensure_namespace, may_read
from queries import find_image

DISK = "application/x-qemu-disk"
ANONYMOUS = {}


@pytest.fixture
def images(app, alice, upload):
    """alice's uploads by where they are: under a public root (in a child namespace), an
    internal one, a private one, and outside namespaces; their ids."""
    for root, visibility in [("pub", "public"), ("inside", "internal"), ("priv", "private")]:
        ensure_namespace(alice.user, (root,), visibility)
    places = {"public": "pub/child", "internal": "inside", "private": "priv", "outside": None}
    return {place: upload(alice, name=place, namespace=ns).json["id"]
            for place, ns in places.items()}


def test_a_public_image_is_read_without_a_token(client, alice, images):
    image_id = images["public"]
    anonymous = client.get(f"/images/{image_id}")
    assert anonymous.status_code == 200
    assert anonymous.json == client.get(f"/images/{image_id}", headers=alice.headers).json
    assert anonymous.json["namespace"]["visibility"] == "public"
    assert "Accept" in anonymous.headers["Vary"]


def test_a_public_images_file_is_served_without_a_token(client, images, qcow2_bytes):
    response = client.get(f"/images/{images['public']}", headers={"Accept": DISK})
    assert response.status_code == 200 and response.data == qcow2_bytes
    assert response.headers["Content-Type"] == DISK
    assert response.headers["Content-Disposition"] == 'attachment; filename="public.qcow2"'
    assert response.headers["ETag"] == f'"{hashlib.sha256(qcow2_bytes).hexdigest()}"'


def test_range_conditionals_and_head_work_without_a_token(client, images, qcow2_bytes):
    url = f"/images/{images['public']}"
    part = client.get(url, headers={"Accept": DISK, "Range": "bytes=0-511"})
    assert part.status_code == 206 and part.data == qcow2_bytes[:512]
    assert part.headers["Content-Range"] == f"bytes 0-511/{len(qcow2_bytes)}"
    etag = part.headers["ETag"]
    assert client.get(url, headers={"Accept": DISK, "If-None-Match": etag}).status_code == 304
    head = client.head(url, headers={"Accept": DISK})
    assert head.status_code == 200 and head.data == b""
    assert head.headers["Content-Length"] == str(len(qcow2_bytes))


@pytest.mark.parametrize("accept", [None, DISK])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_every_other_image_is_401_without_a_token_as_a_missing_one(
        client, images, accept, method):
    """Internal, private, outside namespaces, and an id that names nothing: one answer, so
    that a request without a token learns nothing of what exists."""
    headers = {"Accept": accept} if accept else ANONYMOUS
    answers = [client.open(f"/images/{image_id}", method=method, headers=headers)
               for image_id in (images["internal"], images["private"], images["outside"],
                                999, 0)]
    assert {(a.status_code, a.get_data(), tuple(a.headers)) for a in answers} == {
        (answers[0].status_code, answers[0].get_data(), tuple(answers[0].headers))}
    assert answers[0].status_code == 401
    assert answers[0].headers["WWW-Authenticate"] == 'Bearer realm="imagestore"'
    if method == "GET":
        assert answers[0].json == {"message": "Missing bearer token"}


def test_lists_of_images_always_need_a_token(client, images):
    for query in ("", "?namespace=pub/child@alice", "?name=public"):
        response = client.get(f"/images{query}")
        assert response.status_code == 401
        assert response.json == {"message": "Missing bearer token"}


def test_links_and_changes_need_a_token_even_for_a_public_image(client, images):
    image_id = images["public"]
    for method, path in [("POST", f"/images/{image_id}/links"), ("DELETE", f"/images/{image_id}"),
                         ("POST", "/images?name=x&namespace=pub@alice")]:
        response = client.open(path, method=method, data=b"")
        assert response.status_code == 401, (method, path)
    assert Image.get_or_none(Image.id == image_id) is not None


def test_the_public_namespaces_list_needs_no_token(client, images):
    for path in ("pub/child", "pub"):
        response = client.get(f"/n/alice/{path}/-/images")
        assert response.status_code == 200
    assert [i["id"] for i in client.get("/n/alice/pub/child/-/images").json] == [
        images["public"]]


def test_a_token_that_is_sent_is_checked_even_for_a_public_image(client, make_account, images):
    url = f"/images/{images['public']}"
    bad = client.get(url, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json == {"message": "Invalid token"}
    empty = client.get(url, headers={"Authorization": ""})
    assert empty.status_code == 401 and empty.json == {"message": "Missing bearer token"}
    writer = make_account("writer", "image:write")
    assert client.get(url, headers=writer.headers).status_code == 403


def test_a_user_who_may_not_see_an_image_still_gets_404(client, make_account, images):
    """With a token the answer stays 404 for what one may not see, as for a missing id."""
    carol = make_account("carol")
    for place, status in [("public", 200), ("internal", 200), ("private", 404),
                          ("outside", 404)]:
        assert client.get(f"/images/{images[place]}", headers=carol.headers).status_code == status


# The rules, without a server ---------------------------------------------------------------

@pytest.mark.parametrize("visibility, anonymous, user, writer", [
    ("public", True, True, True), ("internal", False, True, True),
    ("private", False, False, True)])
def test_who_reads_a_namespace_by_its_roots_visibility(alice, visibility, anonymous, user,
                                                       writer):
    assert may_read(None, visibility, lambda: pytest.fail("asked a caller without a token")) \
        is anonymous
    assert may_read(alice.user, visibility, lambda: False) is user
    assert may_read(alice.user, visibility, lambda: True) is writer


def test_may_see_without_a_token_only_under_a_public_root(alice, bob, images):
    expected = {"public": True, "internal": False, "private": False, "outside": False}
    for place, image_id in images.items():
        image = find_image(image_id)
        assert may_see(None, image) is expected[place], place
        assert may_see(alice.user, image) is True
        assert may_see(bob.user, image) is (place in ("public", "internal"))


def test_readable_image_without_a_token_is_401_for_hidden_and_missing_alike(images):
    assert readable_image(None, images["public"]).name == "public"
    for image_id in (images["private"], images["internal"], images["outside"], 10**6):
        with pytest.raises(ApiError) as refused:
            readable_image(None, image_id)
        assert (refused.value.status, refused.value.message) == (401, "Missing bearer token")


# Over the wire -----------------------------------------------------------------------------

def test_anonymous_head_range_and_list_of_a_public_image_on_gunicorn(live_server, qcow2_bytes):
    """The real server, no Authorization header at all: HEAD, a Range, the list."""
    headers = live_server.account("owner")
    live_server.flask("namespace", "create", "pub", "--owner", "owner", "--visibility",
                      "public")
    request = urllib.request.Request(f"{live_server.url}/images?name=pubimg&namespace=pub",
                                     data=qcow2_bytes, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        image = json.load(response)
    address = urlsplit(live_server.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        conn.request("HEAD", f"/images/{image['id']}", headers={"Accept": DISK})
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert head.getheader("Content-Length") == str(len(qcow2_bytes))
        conn.request("GET", f"/images/{image['id']}", headers={"Accept": DISK,
                                                               "Range": "bytes=4-7"})
        part = conn.getresponse()
        assert part.status == 206 and part.read() == qcow2_bytes[4:8]
        conn.request("GET", "/n/owner/pub/-/images")
        listed = conn.getresponse()
        assert listed.status == 200 and [i["id"] for i in json.load(listed)] == [image["id"]]
        conn.request("GET", "/images")
        refused = conn.getresponse()
        assert refused.status == 401 and json.load(refused)["message"]
    finally:
        conn.close()
