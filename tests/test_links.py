"""Signed links (POST /images/:id/links): who may make one, what it serves, when it dies."""

import json
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

import links
from app import create_app
from models import Image


@pytest.fixture
def image(upload, alice):
    created = upload(alice, name="go-dev")
    assert created.status_code == 201, created.json
    return created.json


def make_link(client, account, image_id, **query):
    """POST /images/:id/links as account."""
    return client.post(f"/images/{image_id}/links", headers=account.headers, query_string=query)


def follow(client, url, method="GET", **headers):
    """Request a link's path with no token; return the closed response and its body."""
    with client.open(urlsplit(url).path, method=method, headers=headers) as response:
        body = response.get_data()
    return response, body


def expiry(created):
    """The expires_at of a link answer, as an aware datetime."""
    return datetime.strptime(created.json["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@pytest.mark.parametrize(("query", "seconds"), [({}, 3600), ({"expires_in": "60"}, 60),
                                                ({"expires_in": "604800"}, 7 * 24 * 3600)])
def test_create_link(client, alice, image, query, seconds):
    before = int(time.time())
    created = make_link(client, alice, image["id"], **query)
    after = int(time.time())
    assert created.status_code == 201
    assert set(created.json) == {"url", "expires_at", "qemu_json", "qemu_img_args", "qemu_args"}
    url = urlsplit(created.json["url"])
    assert (url.scheme, url.netloc) == ("http", "localhost")
    assert url.path.startswith("/links/") and url.path.endswith("/go-dev.qcow2")
    assert before + seconds <= expiry(created).timestamp() <= after + seconds


def test_link_answer_gives_ready_qemu_lines(client, alice, image):
    created = make_link(client, alice, image["id"]).json
    url = created["url"]
    assert created["qemu_json"].startswith("json:")
    assert json.loads(created["qemu_json"].removeprefix("json:")) == {
        "driver": "qcow2",
        "file": {"driver": "http", "url": url, "timeout": 60, "readahead": 262144}}
    assert created["qemu_img_args"] == ["convert", "-m", "1", "-f", "qcow2",
                                        created["qemu_json"]]
    assert created["qemu_args"] == [
        "-drive", f"driver=qcow2,file.driver=http,file.url={url},file.timeout=60,"
                  "file.readahead=262144,if=virtio,snapshot=on"]


def test_qemu_lines_follow_an_https_public_url(make_app, alice, image):
    """The curl driver's name must match the scheme; a comma is doubled in a -drive string."""
    client = make_app(PUBLIC_URL="https://store.example.com/a,b").test_client()
    created = make_link(client, alice, image["id"]).json
    assert created["url"].startswith("https://store.example.com/a,b/links/")
    assert json.loads(created["qemu_json"].removeprefix("json:"))["file"]["driver"] == "https"
    drive = created["qemu_args"][1]
    assert drive.startswith("driver=qcow2,file.driver=https,")
    assert "file.url=https://store.example.com/a,,b/links/" in drive


@pytest.mark.parametrize("value", ["0", "604801", "abc", "-5", "1.5", "", " 60", "²",
                                   "9" * 5000])
def test_invalid_expires_in_is_a_field_error(client, alice, image, value):
    created = make_link(client, alice, image["id"], expires_in=value)
    assert created.status_code == 400
    assert list(created.json) == ["expires_in"]


def test_link_needs_a_token_with_image_read(client, make_account, image):
    writer = make_account("alice", "image:write")
    assert make_link(client, writer, image["id"]).status_code == 403
    assert client.post(f"/images/{image['id']}/links").status_code == 401


def test_link_serves_the_file_without_a_token(client, alice, image, qcow2_bytes):
    url = make_link(client, alice, image["id"]).json["url"]
    response, body = follow(client, url)
    assert response.status_code == 200
    assert body == qcow2_bytes
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(qcow2_bytes))
    assert response.headers["Content-Disposition"] == 'attachment; filename="go-dev.qcow2"'
    assert response.headers["ETag"] == f'"{image["sha256"]}"'
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "Last-Modified" in response.headers
    assert "Accept" in response.vary


def test_link_keeps_every_download_rule(client, alice, image, qcow2_bytes):
    url = make_link(client, alice, image["id"]).json["url"]
    size = len(qcow2_bytes)
    ranged, body = follow(client, url, Range="bytes=-512")
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes {size - 512}-{size - 1}/{size}"
    assert body == qcow2_bytes[-512:]
    beyond, _ = follow(client, url, Range=f"bytes={size}-")
    assert (beyond.status_code, beyond.headers["Content-Range"]) == (416, f"bytes */{size}")
    cached, _ = follow(client, url, **{"If-None-Match": f'"{image["sha256"]}"'})
    assert cached.status_code == 304
    head, body = follow(client, url, method="HEAD")
    assert (head.status_code, body) == (200, b"")
    assert head.headers["Content-Length"] == str(size)
    typed, _ = follow(client, url, Accept="application/x-qemu-disk")
    assert typed.headers["Content-Type"] == "application/x-qemu-disk"


def test_expired_link_is_refused(app, client, image):
    row = Image.get_by_id(image["id"])
    token, _ = links.sign_link(app.config["SECRET_KEY"], row, 60, now=time.time() - 3600)
    response, _ = follow(client, f"/links/{token}/go-dev.qcow2")
    assert response.status_code == 403
    assert response.json == {"message": "Link has expired"}


def test_read_link_refuses_at_its_expiry():
    class Row:
        id, storage_key = 7, "k"

    token, expires_at = links.sign_link("key", Row, 60, now=1000)
    assert links.read_link("key", token, now=1059)[0] == 7
    with pytest.raises(links.ApiError):
        links.read_link("key", token, now=expires_at.timestamp())


def flip(text, at):
    """text with the character at index at changed."""
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1:]


@pytest.mark.parametrize("tamper", [
    lambda token: flip(token, token.rindex(".") + 10),  # another signature
    lambda token: flip(token, 0),  # another payload
    lambda token: "not-a-token",
])
def test_tampered_link_is_refused(client, alice, image, tamper):
    url = make_link(client, alice, image["id"]).json["url"]
    _, _, token, name = urlsplit(url).path.split("/")
    response, _ = follow(client, f"/links/{tamper(token)}/{name}")
    assert response.status_code == 403
    assert response.json == {"message": "Link is not valid"}


def test_link_dies_when_secret_key_changes(app, client, alice, image, tmp_path):
    url = make_link(client, alice, image["id"]).json["url"]
    rotated = create_app({**{k: app.config[k] for k in ("DATABASE_URL", "STORAGE_URL")},
                          "TESTING": True, "SECRET_KEY": "another-secret"},
                         instance_path=app.instance_path)
    response, _ = follow(rotated.test_client(), url)
    assert response.status_code == 403
    assert response.headers["Content-Type"] == "application/json"


def test_link_dies_with_its_image(client, alice, image):
    url = make_link(client, alice, image["id"]).json["url"]
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204
    response, _ = follow(client, url)
    assert response.status_code == 404
    assert response.json == {"message": "Not Found"}


def test_link_does_not_serve_a_later_image_with_the_same_id(client, alice, image, upload):
    url = make_link(client, alice, image["id"]).json["url"]
    client.delete(f"/images/{image['id']}", headers=alice.headers)
    later = upload(alice, name="go-dev").json
    # SQLite reuses the highest id; make it so on any database.
    Image.update(id=image["id"]).where(Image.id == later["id"]).execute()
    assert client.get(f"/images/{image['id']}", headers=alice.headers).status_code == 200
    response, _ = follow(client, url)
    assert response.status_code == 404


def test_nobody_links_to_an_image_they_cannot_see(client, bob, image):
    created = make_link(client, bob, image["id"])
    assert created.status_code == 404
    assert created.json == {"message": "Not Found"}
    assert make_link(client, bob, image["id"] + 1000).status_code == 404


@pytest.mark.parametrize("visibility", ["public", "internal"])
def test_an_open_namespace_lets_others_link(client, runner, alice, bob, upload, qcow2_bytes,
                                            visibility):
    made = runner.invoke(args=["namespace", "create", "shared", "--owner", "alice",
                               "--visibility", visibility])
    assert made.exit_code == 0, made.output
    image = upload(alice, name="base", namespace="shared").json
    created = make_link(client, bob, image["id"])
    assert created.status_code == 201
    response, body = follow(client, created.json["url"])
    assert (response.status_code, body) == (200, qcow2_bytes)
