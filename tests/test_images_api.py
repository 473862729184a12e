"""The images API through the Flask test client: create, get, list, search, delete."""

import hashlib
import io
import json
import re
import subprocess
from datetime import datetime, timedelta

import pytest
from conftest import make_qcow2, make_rows

import image_changes
from errors import ValidationError
from models import Image

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
IMAGE_FIELDS = {"id", "author_id", "user_id", "namespace_id", "name", "created_at", "url",
                "author", "user", "namespace", "size", "virtual_size", "sha256", "driver",
                "download"}


def test_create_returns_the_image_object(client, alice, upload, qcow2_bytes):
    response = upload(alice, name="go-dev")
    assert response.status_code == 201
    image = response.json
    assert set(image) == IMAGE_FIELDS
    assert image["name"] == "go-dev"
    assert image["author_id"] == image["user_id"] == alice.user.id
    assert image["namespace_id"] is None and image["namespace"] is None
    assert image["author"] == image["user"] == {
        "id": alice.user.id, "email": "alice@example.com", "username": "alice",
        "created_at": image["user"]["created_at"]}
    assert RFC3339.fullmatch(image["created_at"])
    assert image["url"] == f"http://localhost/images/{image['id']}"
    assert response.headers["Location"] == image["url"]
    assert image["size"] == len(qcow2_bytes)
    assert image["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()
    assert image["virtual_size"] == 64 * 1024 * 1024
    assert image["driver"] == "qemu"
    assert image["download"] is None  # uploaded, not imported from a URL


def test_created_image_is_stored_byte_for_byte(app, alice, upload, qcow2_bytes, store_files):
    image = upload(alice).json
    key = Image.get_by_id(image["id"]).storage_key
    with app.extensions["storage"].open(key) as f:
        assert f.read() == qcow2_bytes
    assert store_files() == [f"{key}.qcow2"]


def test_public_url_is_the_base_of_urls(app, client, alice, upload):
    app.config["PUBLIC_URL"] = "https://images.example.com"
    image = upload(alice).json
    assert image["url"] == f"https://images.example.com/images/{image['id']}"


def test_forwarded_headers_ignored_unless_trusted(client, alice, upload):
    headers = {**alice.headers, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    image = upload(alice).json
    got = client.get(f"/images/{image['id']}", headers=headers)
    assert got.json["url"].startswith("http://localhost/")


def test_multipart_upload_with_file_field(client, alice, qcow2_bytes):
    response = client.post("/images?name=form", headers=alice.headers,
                           data={"file": (io.BytesIO(qcow2_bytes), "x.qcow2")},
                           content_type="multipart/form-data")
    assert response.status_code == 201
    assert response.json["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()


def test_multipart_without_file_field_is_400(client, alice, store_files):
    response = client.post("/images?name=form", headers=alice.headers,
                           data={"other": "x"}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "file" in response.json
    assert store_files() == []


def post_chunked(client, account, name, body):
    """A chunked POST as gunicorn presents it: no length, the stream ends itself."""
    return client.post(f"/images?name={name}", headers={
        **account.headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True})


def test_chunked_upload(client, alice, qcow2_bytes):
    response = post_chunked(client, alice, "chunked", qcow2_bytes)
    assert response.status_code == 201, response.json
    assert response.json["size"] == len(qcow2_bytes)


@pytest.mark.parametrize("query, message", [
    ({}, "Name field required"),
    ({"name": ""}, "Name field required"),
    ({"name": "has space"}, "Name must be"),
    ({"name": "dots.not.allowed"}, "Name must be"),
    ({"name": "x" * 65}, "Name must be"),
])
def test_bad_name_is_400_on_name(client, alice, qcow2_bytes, store_files, query, message):
    response = client.post("/images", query_string=query, headers=alice.headers, data=qcow2_bytes)
    assert response.status_code == 400
    assert list(response.json) == ["name"]
    assert response.json["name"][0].startswith(message)
    assert store_files() == []


def test_name_of_64_characters_is_accepted(alice, upload):
    assert upload(alice, name="a-_" * 21 + "z").status_code == 201


def test_duplicate_name_is_400_and_leaves_nothing(alice, upload, store_files):
    upload(alice, name="dup")
    before = store_files()
    response = upload(alice, name="dup")
    assert response.status_code == 400
    assert response.json == {"name": ["Name already exists"]}
    assert store_files() == before
    assert Image.select().count() == 1


def test_same_name_for_two_users_is_fine(alice, bob, upload):
    assert upload(alice, name="same").status_code == 201
    assert upload(bob, name="same").status_code == 201


def test_database_refuses_duplicate_even_past_the_early_check(app, alice, upload, store_files):
    """Two racing uploads both pass the early check; the unique index decides."""
    plan = image_changes.plan_upload(alice.user, "race", None)
    assert upload(alice, name="race").status_code == 201
    storage = app.extensions["storage"]
    before = store_files()
    with storage.staging() as staged:
        staged.file.write(b"x")
        with pytest.raises(ValidationError) as refused:
            image_changes.create_image(plan, storage, staged, 1, "0" * 64,
                                       type("Info", (), {"virtual_size": 1})())
    assert refused.value.fields == {"name": ["Name already exists"]}
    assert store_files() == before


def test_not_qcow2_is_400_on_file_and_leaves_nothing(alice, upload, store_files):
    response = upload(alice, data=b"this is not a disk image" * 100)
    assert response.status_code == 400
    assert list(response.json) == ["file"]
    assert response.json["file"][0].startswith("File not a valid QCOW2 image")
    assert store_files() == []
    assert Image.select().count() == 0


def test_empty_body_is_refused(client, alice, store_files):
    response = client.post("/images?name=e", headers=alice.headers,
                           environ_overrides={"CONTENT_LENGTH": "0"})
    assert response.status_code == 400 and "file" in response.json
    assert store_files() == []


def test_body_without_length_is_411(client, alice):
    response = client.post("/images?name=x", headers=alice.headers)
    assert response.status_code == 411
    assert response.json["message"].startswith("Length Required")


def test_content_length_over_limit_is_413_before_reading(app, client, alice, store_files):
    app.config["MAX_IMAGE_SIZE"] = 1000

    class Unread(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise AssertionError("the body must not be read")

    response = client.post("/images?name=big", headers=alice.headers, environ_overrides={
        "CONTENT_LENGTH": "1001", "wsgi.input": Unread()})
    assert response.status_code == 413
    assert response.json["message"] == "Image larger than the limit of 1000 bytes"
    assert store_files() == []


def test_chunked_body_over_limit_is_413(app, client, alice, qcow2_bytes, store_files):
    app.config["MAX_IMAGE_SIZE"] = len(qcow2_bytes) - 1
    response = post_chunked(client, alice, "big", qcow2_bytes)
    assert response.status_code == 413
    assert store_files() == []


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_compressed_body_is_415(client, alice, qcow2_bytes, encoding, store_files):
    response = client.post("/images?name=z", data=qcow2_bytes,
                           headers={**alice.headers, "Content-Encoding": encoding})
    assert response.status_code == 415
    assert "Content-Encoding" in response.json["message"]
    assert store_files() == []


def test_get_json(client, alice, upload):
    image = upload(alice).json
    response = client.get(f"/images/{image['id']}", headers=alice.headers)
    assert response.status_code == 200
    assert response.json == image
    assert "Accept" in response.headers["Vary"]


def test_get_missing_is_404(client, alice):
    response = client.get("/images/999", headers=alice.headers)
    assert response.status_code == 404 and response.json == {"message": "Not Found"}


def test_other_users_image_is_404_for_get_download_and_delete(client, alice, bob, upload):
    image_id = upload(alice).json["id"]
    for response in (
        client.get(f"/images/{image_id}", headers=bob.headers),
        client.get(f"/images/{image_id}", headers={**bob.headers,
                                                    "Accept": "application/octet-stream"}),
        client.delete(f"/images/{image_id}", headers=bob.headers),
        client.post(f"/images/{image_id}/links", headers=bob.headers),
    ):
        assert response.status_code == 404
        assert response.json == {"message": "Not Found"}
    assert Image.get_or_none(Image.id == image_id) is not None


def test_download_is_the_file(client, alice, upload, qcow2_bytes):
    image = upload(alice, name="dl").json
    response = client.get(f"/images/{image['id']}",
                          headers={**alice.headers, "Accept": "application/x-qemu-disk"})
    assert response.status_code == 200
    assert response.data == qcow2_bytes
    assert response.headers["Content-Type"] == "application/x-qemu-disk"
    assert response.headers["Content-Length"] == str(len(qcow2_bytes))
    assert response.headers["Content-Disposition"] == 'attachment; filename="dl.qcow2"'


def test_delete_removes_row_and_file(client, alice, upload, store_files):
    image_id = upload(alice).json["id"]
    response = client.delete(f"/images/{image_id}", headers=alice.headers)
    assert response.status_code == 204
    assert response.data == b""
    assert store_files() == []
    assert client.get(f"/images/{image_id}", headers=alice.headers).status_code == 404
    assert client.delete(f"/images/{image_id}", headers=alice.headers).status_code == 404


def test_delete_with_file_already_gone_is_no_error(app, client, alice, upload):
    image_id = upload(alice).json["id"]
    app.extensions["storage"].delete(Image.get_by_id(image_id).storage_key)
    assert client.delete(f"/images/{image_id}", headers=alice.headers).status_code == 204


# Listing ---------------------------------------------------------------------------------

def test_empty_list(client, alice):
    response = client.get("/images", headers=alice.headers)
    assert response.status_code == 200
    assert response.json == []
    assert "Link" not in response.headers


def test_exactly_25_is_one_page_without_links(client, alice):
    make_rows(alice, 25)
    response = client.get("/images", headers=alice.headers)
    assert len(response.json) == 25
    assert "Link" not in response.headers


def test_26_makes_a_second_page(client, alice):
    make_rows(alice, 26)
    first = client.get("/images", headers=alice.headers)
    assert [i["name"] for i in first.json][:2] == ["img25", "img24"]
    assert first.headers["Link"] == '<http://localhost/images?page=2>; rel="next"'
    second = client.get("/images?page=2", headers=alice.headers)
    assert [i["name"] for i in second.json] == ["img0"]
    assert second.headers["Link"] == '<http://localhost/images?page=1>; rel="prev"'


def test_middle_page_has_both_links_keeping_search(client, alice):
    make_rows(alice, 60, prefix="go")
    response = client.get("/images?search=go&page=2", headers=alice.headers)
    assert len(response.json) == 25
    assert response.headers["Link"] == (
        '<http://localhost/images?page=1&search=go>; rel="prev", '
        '<http://localhost/images?page=3&search=go>; rel="next"')


def test_page_past_the_end_is_empty(client, alice):
    make_rows(alice, 3)
    response = client.get("/images?page=5", headers=alice.headers)
    assert response.status_code == 200 and response.json == []
    assert 'rel="next"' not in response.headers.get("Link", "")


@pytest.mark.parametrize("page", ["0", "-1", "abc", "", "1.5"])
def test_bad_page_means_1(client, alice, page):
    make_rows(alice, 30)
    response = client.get(f"/images?page={page}", headers=alice.headers)
    assert response.status_code == 200
    assert response.json[0]["name"] == "img29"
    assert 'rel="prev"' not in response.headers["Link"]


def test_newest_first_then_by_id(client, alice):
    same_second = datetime(2024, 5, 5)
    make_rows(alice, 3, prefix="a", start=same_second - timedelta(seconds=10))
    for name in ("x", "y"):
        Image.create(author=alice.user, user=alice.user, name=name, storage_key=name, size=1,
                     virtual_size=1, sha256="0" * 64, created_at=same_second)
    names = [i["name"] for i in client.get("/images", headers=alice.headers).json]
    assert names == ["y", "x", "a2", "a1", "a0"]


def test_list_shows_only_own_images(client, alice, bob):
    make_rows(alice, 2, prefix="alice")
    make_rows(bob, 2, prefix="bob")
    names = {i["name"] for i in client.get("/images", headers=bob.headers).json}
    assert names == {"bob0", "bob1"}


@pytest.mark.parametrize("search, expected", [
    ("GO", {"go-dev", "Golang", "ergo"}),
    ("go-", {"go-dev"}),
    ("%", {"100%"}),
    ("_", {"a_b"}),
    ("a_b", {"a_b"}),
    ("nothing", set()),
])
def test_search_is_case_insensitive_substring_with_literal_wildcards(
        client, alice, search, expected):
    for i, name in enumerate(["go-dev", "Golang", "ergo", "100%", "a_b", "axb"]):
        Image.create(author=alice.user, user=alice.user, name=name, storage_key=f"k{i}",
                     size=1, virtual_size=1, sha256="0" * 64)
    response = client.get("/images", query_string={"search": search}, headers=alice.headers)
    assert {i["name"] for i in response.json} == expected


def test_deleted_newest_id_is_never_handed_out_again(client, alice, upload):
    """A client holding a deleted image's id must not reach the next upload with it."""
    first = upload(alice, name="one").json["id"]
    assert client.delete(f"/images/{first}", headers=alice.headers).status_code == 204
    second = upload(alice, name="two").json["id"]
    assert second != first
    assert client.get(f"/images/{first}", headers=alice.headers).status_code == 404


def test_chunked_multipart_over_limit_is_413_and_leaves_nothing(tmp_path, make_account):
    """A multipart body is parsed before the upload code runs: Werkzeug must stop it too."""
    from app import create_app
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "STORAGE_URL": f"file://{tmp_path / 'images'}", "SECRET_KEY": "k",
                      "MAX_IMAGE_SIZE": 4096}, instance_path=str(tmp_path / "instance"))
    account = make_account("big")
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * 8192 + \
        f"\r\n--{boundary}--\r\n".encode()
    response = app.test_client().post(
        "/images?name=big", headers={**account.headers, "Transfer-Encoding": "chunked",
                                     "Content-Type": f"multipart/form-data; boundary={boundary}"},
        environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True})
    assert response.status_code == 413
    assert response.is_json and response.json["message"]
    assert list((tmp_path / "images").rglob("*.qcow2")) == []
    assert list((tmp_path / "images" / ".incoming").iterdir()) == []


def test_forwarded_headers_honoured_when_trusted(tmp_path, make_account, qcow2_bytes):
    from app import create_app
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      "STORAGE_URL": f"file://{tmp_path / 'images'}", "SECRET_KEY": "k",
                      "TRUST_PROXY_HEADERS": True}, instance_path=str(tmp_path / "instance"))
    account = make_account("proxied")
    response = app.test_client().post(
        "/images?name=p", data=qcow2_bytes, headers={
            **account.headers, "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "images.example.com"})
    assert response.status_code == 201
    assert response.json["url"].startswith("https://images.example.com/images/")


# An upload sent with `curl -d @file` -------------------------------------------------------

FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def qcow2_with_newline(tmp_path_factory):
    """A valid qcow2 with a LF byte in its header (its virtual size is 0x000a0000 bytes)."""
    path = make_qcow2(tmp_path_factory.mktemp("lf") / "lf.qcow2", "640K")
    assert b"\n" in path.read_bytes()[:64]
    return path


def as_curl_d_sends(data):
    """What `curl -d @file` sends of a file: every CR and LF removed."""
    return data.replace(b"\r", b"").replace(b"\n", b"")


def test_a_file_mangled_by_curl_d_is_refused_with_how_to_send_it(
        client, alice, qcow2_with_newline, store_files):
    body = as_curl_d_sends(qcow2_with_newline.read_bytes())
    response = client.post("/images?name=dashd", headers=alice.headers, data=body,
                           content_type=FORM)
    assert response.status_code == 400
    (message,) = response.json["file"]
    assert "curl --data-binary @file" in message and "-T file" in message
    # --data-binary sends the same type, unchanged: the hint cannot say which was used.
    assert "if it was sent with `curl -d @file`" in message
    assert store_files() == []
    other = client.post("/images?name=raw", headers=alice.headers, data=body,
                        content_type="application/octet-stream")
    assert "--data-binary" not in other.json["file"][0]
    assert other.json["file"][0] in message


def test_real_curl_d_gets_the_hint_and_data_binary_works(live_server, qcow2_with_newline):
    """curl's -d and --data-binary both send the form type; only -d strips the file."""
    auth = "Authorization: " + live_server.account("curler")["Authorization"]

    def curl(option, name):
        done = subprocess.run(
            ["curl", "-sS", "-X", "POST", "-H", auth, option, f"@{qcow2_with_newline}",
             f"{live_server.url}/images?name={name}", "-w", "\\n%{http_code}"],
            capture_output=True, check=True, timeout=60)
        body, _, status = done.stdout.rpartition(b"\n")
        return int(status), json.loads(body)

    status, refused = curl("-d", "dashd")
    assert status == 400 and "curl --data-binary @file" in refused["file"][0]
    status, stored = curl("--data-binary", "binary")
    assert status == 201 and stored["size"] == qcow2_with_newline.stat().st_size
