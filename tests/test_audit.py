"""The audit log: one JSON line for every change, every file read and every failed
authentication, with who, from where, which image and the answer; never a token, a
link's signature or a password."""

import hashlib
import json
import re
import threading
from urllib.parse import urlsplit

import pytest
import sample_images
from conftest import http_call, make_qcow2, server_with_account
from test_ui import post_form_upload, sign_in

import audit
from auth import hash_token
from models import Token

FIELDS = ["time", "action", "user", "token_id", "client", "image_id", "name", "namespace",
          "sha256", "bytes", "status"]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


NO_IMAGE = dict.fromkeys(("image_id", "name", "namespace", "sha256", "bytes"))


def alice_on_an_audited_app(make_app, make_account, tmp_path):
    """An app writing its audit log to a file, and alice with every scope: (test client,
    the log's path, alice's account, the audit fields of her requests)."""
    path = tmp_path / "audit.log"
    app = make_app(AUDIT_LOG=str(path))
    with app.app_context():
        alice = make_account("alice")
        by_alice = {"user": "alice", "token_id": token_id(alice), "client": "127.0.0.1"}
    return app.test_client(), path, alice, by_alice


def lines_of(path):
    """Every line of the audit log at path, each parsed (a line that is not one JSON
    object fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(entries):
    """The entries without their time (checked for its shape)."""
    assert all(TIME.fullmatch(entry["time"]) for entry in entries)
    return [{key: value for key, value in entry.items() if key != "time"} for entry in entries]


def token_id(account):
    return Token.get(Token.token_hash == hash_token(account.token)).id


def secrets_of_link(url):
    """The signed token in a link's path, and its signature (the part after the last dot)."""
    token = urlsplit(url).path.split("/")[2]
    return token, token.rsplit(".", 1)[1]


# --- the rules, without a server ---------------------------------------------------------

@pytest.mark.parametrize(("text", "shown"), [
    ("https://user:hunter2@example.com/a.qcow2", "https://example.com/a.qcow2"),
    ("http://user:p@ss@example.com:8080/a.qcow2", "http://example.com:8080/a.qcow2"),
    ("https://tokenonly@example.com/a", "https://example.com/a"),
    ("fetching https://u:hunter2@mirror.example/x failed: 403",
     "fetching https://mirror.example/x failed: 403"),
    ("https://example.com/a@b.qcow2?who=me@example.com",
     "https://example.com/a@b.qcow2?who=me@example.com"),
    ("http://[::1]:8080/a.qcow2", "http://[::1]:8080/a.qcow2"),
    ("mailto:someone@example.com", "mailto:someone@example.com"),
])
def test_a_url_is_shown_without_its_user_and_password(text, shown):
    assert audit.without_credentials(text) == shown


def test_a_line_is_one_json_object_with_every_field_in_order(tmp_path):
    path = tmp_path / "audit.log"
    audit.configure(str(path))
    audit.record("import", user="alice", token_id=3, client="192.0.2.7", status=201,
                 source="https://alice:hunter2@example.com/alpine.qcow2")
    [entry] = lines_of(path)
    assert list(entry) == [*FIELDS, "source"]
    assert without_time([entry]) == [{
        "action": "import", "user": "alice", "token_id": 3, "client": "192.0.2.7",
        "image_id": None, "name": None, "namespace": None, "sha256": None, "bytes": None,
        "status": 201, "source": "https://example.com/alpine.qcow2"}]
    assert "hunter2" not in path.read_text()


def test_an_unknown_action_is_a_bug_not_a_line(tmp_path):
    audit.configure(str(tmp_path / "audit.log"))
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.record("uploaded")
    assert (tmp_path / "audit.log").read_text() == ""


def test_the_log_goes_to_standard_error_by_default(capsys):
    audit.configure(None)
    audit.record("delete", user="bob", status=204)
    err = capsys.readouterr().err
    assert [json.loads(line)["action"] for line in err.splitlines()] == ["delete"]


# --- through the app ---------------------------------------------------------------------

def test_one_line_for_each_action_with_who_what_and_the_answer(make_app, make_account,
                                                               qcow2_bytes, tmp_path):
    path = tmp_path / "audit.log"
    app = make_app(AUDIT_LOG=str(path))
    client = app.test_client()
    with app.app_context():
        alice, reader = make_account("alice"), make_account("reader", "image:read")
        alice_id, reader_id = token_id(alice), token_id(reader)
    created = client.post("/images?name=go-dev&namespace=djinn/ci", data=qcow2_bytes,
                          headers=alice.headers).json
    assert client.post("/images?name=junk", data=b"not an image",
                       headers=alice.headers).status_code == 400
    image = f"/images/{created['id']}"
    disk = {**alice.headers, "Accept": "application/octet-stream"}
    assert client.get(image, headers=disk).status_code == 200
    made = client.post(f"{image}/links", headers=alice.headers).json
    link = made["url"]
    link_path = urlsplit(link).path
    assert client.get(link_path, headers={"Range": "bytes=0-9"}).status_code == 206
    token, signature = secrets_of_link(link)
    forged = link_path.replace(signature, signature[::-1])
    assert client.get(forged).status_code == 403
    assert client.get("/images").status_code == 401
    assert client.get("/images", headers={"Authorization": "Bearer ims_guessed"}
                      ).status_code == 401
    assert client.delete(image, headers=reader.headers).status_code == 403
    assert client.delete(image, headers=alice.headers).status_code == 204

    the_image = {"image_id": created["id"], "name": "go-dev", "namespace": "djinn/ci@alice",
                 "sha256": created["sha256"], "bytes": len(qcow2_bytes)}
    by_alice = {"user": "alice", "token_id": alice_id, "client": "127.0.0.1"}
    nobody = {"user": None, "token_id": None, "client": "127.0.0.1"}
    entries = lines_of(path)
    assert without_time(entries) == [
        {"action": "upload", **by_alice, **the_image, "status": 201},
        {"action": "refuse", **by_alice, **NO_IMAGE, "name": "junk", "status": 400,
         "rule": "not_qcow2"},
        {"action": "download", **by_alice, **the_image, "status": 200},
        {"action": "link.create", **by_alice, **the_image, "status": 201,
         "expires_at": made["expires_at"]},
        {"action": "link.use", **nobody, **the_image, "bytes": 10, "status": 206},
        {"action": "auth.failure", **nobody, **NO_IMAGE, "status": 403,
         "reason": "Link is not valid", "method": "GET", "route": "/links/<token>/<filename>"},
        {"action": "auth.failure", **nobody, **NO_IMAGE, "status": 401,
         "reason": "Missing bearer token", "method": "GET", "route": "/images"},
        {"action": "auth.failure", **nobody, **NO_IMAGE, "status": 401,
         "reason": "Invalid token", "method": "GET", "route": "/images"},
        {"action": "auth.failure", "user": "reader", "token_id": reader_id,
         "client": "127.0.0.1", **NO_IMAGE, "status": 403,
         "reason": "Token lacks the image:delete scope", "method": "DELETE",
         "route": "/images/<int:image_id>"},
        {"action": "delete", **by_alice, **the_image, "status": 204},
    ]
    text = path.read_text()
    for secret in (alice.token, reader.token, "ims_guessed", token, signature):
        assert secret not in text


def test_an_import_refused_at_its_post_has_its_line_with_the_url_asked_for(
        make_app, make_account, tmp_path):
    """A download_url the address guard refuses (here the cloud metadata address) is what
    an operator wants to see; its password is never written, even where the URL is cut."""
    client, path, alice, by_alice = alice_on_an_audited_app(make_app, make_account, tmp_path)
    long_secret = "hunter2" * 40
    asked = [{"name": "probe", "namespace": "ops",
              "download_url": "http://u:hunter2@169.254.169.254/latest/meta-data"},
             {"name": "probe2", "download_url": f"http://u:{long_secret}@169.254.169.254/"},
             ["not", "an", "object"]]
    for body in asked:
        assert client.post("/images", json=body, headers=alice.headers).status_code == 400
    assert without_time(lines_of(path)) == [
        {"action": "refuse", **by_alice, **NO_IMAGE, "name": "probe", "namespace": "ops",
         "status": 400, "rule": "download_url",
         "source": "http://169.254.169.254/latest/meta-data"},
        {"action": "refuse", **by_alice, **NO_IMAGE, "name": "probe2", "status": 400,
         "rule": "download_url", "source": "http://169.254.169.254/"},
        {"action": "refuse", **by_alice, **NO_IMAGE, "status": 400, "rule": "broken_body",
         "source": None},
    ]
    assert "hunter2" not in path.read_text()


def test_the_web_uis_uploads_links_and_deletes_have_their_lines(make_app, make_account,
                                                              qcow2_bytes, tmp_path):
    """The form's changes are written as the API's are, with the signed-in user and the
    status the browser was answered with."""
    client, path, alice, by_alice = alice_on_an_audited_app(make_app, make_account, tmp_path)
    csrf = sign_in(client, alice)
    stored = post_form_upload(client, csrf, qcow2_bytes, name="kept")
    assert stored.status_code == 303
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    assert post_form_upload(client, csrf, hostile, name="sneaky",
                            namespace="new").status_code == 400
    page = stored.headers["Location"]
    assert client.post(f"{page}/links", data={"csrf_token": csrf,
                                              "expires_in": "3600"}).status_code == 200
    assert client.post(f"{page}/delete", data={"csrf_token": csrf}).status_code == 303

    image_id = int(page.rsplit("/", 1)[1])
    the_image = {"image_id": image_id, "name": "kept", "namespace": None,
                 "sha256": hashlib.sha256(qcow2_bytes).hexdigest(), "bytes": len(qcow2_bytes)}
    entries = without_time(lines_of(path))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entries[2].pop("expires_at"))
    assert entries == [
        {"action": "upload", **by_alice, **the_image, "status": 303},
        {"action": "refuse", **by_alice, **NO_IMAGE, "name": "sneaky", "namespace": "new",
         "status": 400, "rule": "backing_file"},
        {"action": "link.create", **by_alice, **the_image, "status": 200},
        {"action": "delete", **by_alice, **the_image, "status": 303},
    ]


def test_the_client_address_is_the_proxys_client_when_proxy_headers_are_trusted(
        make_app, make_account, tmp_path):
    path = tmp_path / "audit.log"
    client = make_app(AUDIT_LOG=str(path), TRUST_PROXY_HEADERS=True).test_client()
    assert client.get("/images", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 401
    assert [entry["client"] for entry in lines_of(path)] == ["203.0.113.9"]


# --- over a real gunicorn ----------------------------------------------------------------

def test_every_worker_writes_whole_lines_to_the_one_audit_log(tmp_path):
    """Two workers, many downloads at once: every line of AUDIT_LOG is one JSON object."""
    path = tmp_path / "audit.log"
    image = make_qcow2(tmp_path / "disk.qcow2", "1M").read_bytes()
    with server_with_account(tmp_path / "instance", "alice", {"AUDIT_LOG": str(path)}) as server:
        status, _, body = http_call(server, "POST", "/images?name=base", server.headers, image)
        assert status == 201, body
        created = json.loads(body)
        status, _, body = http_call(server, "POST", f"/images/{created['id']}/links",
                                    server.headers)
        link = json.loads(body)["url"]
        answers = []

        def follow():
            answers.append(http_call(server, "GET", urlsplit(link).path)[0])

        threads = [threading.Thread(target=follow) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [200] * 20
        assert http_call(server, "DELETE", f"/images/{created['id']}", server.headers)[0] == 204
    entries = lines_of(path)
    assert [entry["action"] for entry in entries] == [
        "upload", "link.create", *["link.use"] * 20, "delete"]
    assert {entry["sha256"] for entry in entries} == {hashlib.sha256(image).hexdigest()}
    text = path.read_text()
    token, signature = secrets_of_link(link)
    assert server.headers["Authorization"].split()[1] not in text
    assert token not in text and signature not in text
