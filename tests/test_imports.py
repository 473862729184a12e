"""Imports from a URL (POST /images with a JSON body): the checks of the POST, the fetch
under every rule of an upload against real servers on loopback, the 409 until the file
is in, and what a restart does with an import that was cut off.

Until jobs.py lands the fetch is run here, from the payload that the POST queued: the
`queued` fixture keeps each payload that imports.queue_fetch is handed, and `run_queued`
runs it with the job's own handler (imports.job_handler), as a worker's thread would.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import sample_images
from conftest import ROOT, TEST_SECRET_KEY, files_under, server_with_account
from origin_servers import (
    WAIT,
    basic_auth,
    origin_server,
    redirect,
    serve,
    stall,
    stream,
)

import imports
from config import load_config
from models import Image, Namespace, db, utcnow
from qcow2 import HEADER_READ_SIZE

MIB = 1 << 20


@pytest.fixture
def app(make_app):
    """The app with localhost allowed to imports (the origin servers listen on loopback)
    and a stall timeout short enough for a test."""
    return make_app(DOWNLOAD_ALLOW_HOSTS=frozenset({"localhost"}), DOWNLOAD_STALL_TIMEOUT=0.5)


@pytest.fixture
def origin():
    with origin_server() as server:
        yield server


@pytest.fixture
def queued(monkeypatch):
    """The payloads that POSTs queued (jobs.enqueue's, once jobs.py is merged)."""
    payloads = []
    monkeypatch.setattr(imports, "queue_fetch",
                        lambda *args: payloads.append(imports.job_payload(*args)))
    return payloads


@pytest.fixture
def run_queued(app, queued):
    """Run every queued import with the job's handler; return the last image's row."""

    def run():
        handler = imports.job_handler(app.extensions["storage"], app.config)
        while queued:
            payload = queued.pop(0)
            handler(payload)
        return Image.get_by_id(payload["image_id"])

    return run


@pytest.fixture
def import_served(origin, post_import, run_queued):
    """Serve /image.qcow2 with route, import it, run the import: the image's row."""

    def run(route):
        origin.routes["/image.qcow2"] = route
        post_import(name="alpine", download_url=origin.url("/image.qcow2", "localhost"))
        return run_queued()

    return run


@pytest.fixture
def post_import(client, alice):
    """POST /images with a JSON body (fields given, or raw bytes) as alice."""

    def post(raw=None, account=alice, **fields):
        data = raw if raw is not None else json.dumps(fields)
        return client.post("/images", data=data, headers=account.headers,
                           content_type="application/json")

    return post


def staged_files(app):
    """What is left in the store's staging folder."""
    return files_under(app.extensions["storage"].staging_folder)


def get_file(client, account, image_id, method="GET"):
    return client.open(f"/images/{image_id}", method=method, headers={
        **account.headers, "Accept": "application/octet-stream"})


def test_the_settings_of_imports_are_read_from_the_environment(tmp_path):
    defaults = load_config(str(tmp_path), environ={})
    assert (defaults["DOWNLOAD_ALLOW_PRIVATE"], defaults["DOWNLOAD_ALLOW_HOSTS"],
            defaults["DOWNLOAD_CONNECT_TIMEOUT"], defaults["DOWNLOAD_STALL_TIMEOUT"]) == (
        False, frozenset(), 10, 60)
    config = load_config(str(tmp_path), environ={
        "DOWNLOAD_ALLOW_PRIVATE": "1", "DOWNLOAD_ALLOW_HOSTS": " Mirror.Internal, [::1],,10.0.0.5",
        "DOWNLOAD_CONNECT_TIMEOUT": "2.5", "DOWNLOAD_STALL_TIMEOUT": "30"})
    assert (config["DOWNLOAD_ALLOW_PRIVATE"], config["DOWNLOAD_ALLOW_HOSTS"],
            config["DOWNLOAD_CONNECT_TIMEOUT"], config["DOWNLOAD_STALL_TIMEOUT"]) == (
        True, frozenset({"mirror.internal", "::1", "10.0.0.5"}), 2.5, 30)


# --- the POST ----------------------------------------------------------------------------

def test_a_json_body_creates_the_image_at_once_with_its_file_still_to_come(
        post_import, queued, client, alice):
    url = "https://images.example.com/alpine.qcow2"
    created = post_import(name="alpine", namespace="djinn", download_url=url)
    assert created.status_code == 201
    body = created.json
    assert created.headers["Location"] == body["url"]
    assert (body["name"], body["namespace"]["path"]) == ("alpine", "djinn")
    assert (body["size"], body["virtual_size"], body["sha256"]) == (None, None, None)
    row = Image.get_by_id(body["id"])
    assert row.download_source == url and row.download_created_at is not None
    assert (row.download_started_at, row.download_finished_at, row.download_error) == (
        None, None, None)
    assert queued == [{"image_id": body["id"], "credentials": None,
                       "base_url": "http://localhost"}]
    assert client.get(f"/images/{body['id']}", headers=alice.headers).json == body


def test_until_the_file_is_in_the_file_and_links_answer_409(post_import, client, alice):
    image_id = post_import(name="alpine", download_url="https://example.com/a.qcow2").json["id"]
    not_yet = {"message": "Image not downloaded yet"}
    assert (get_file(client, alice, image_id).status_code,
            get_file(client, alice, image_id).json) == (409, not_yet)
    assert get_file(client, alice, image_id, "HEAD").status_code == 409
    link = client.post(f"/images/{image_id}/links", headers=alice.headers)
    assert (link.status_code, link.json) == (409, not_yet)


@pytest.mark.parametrize(("fields", "errors"), [
    ({"download_url": "https://example.com/a.qcow2"}, {"name": ["Name field required"]}),
    ({"name": "a b", "download_url": "https://example.com/a.qcow2"},
     {"name": ["Name must be 1 to 64 of a-z, A-Z, 0-9, _ and -"]}),
    ({"name": 5, "download_url": "https://example.com/a.qcow2"},
     {"name": ["Name must be a string"]}),
    ({"name": "a", "namespace": ["djinn"], "download_url": "https://example.com/a.qcow2"},
     {"namespace": ["Namespace must be a string"]}),
    ({"name": "a", "namespace": "djinn@bob", "download_url": "https://example.com/a.qcow2"},
     {"namespace": ["Namespace permission denied"]}),
    ({"name": "a"}, {"download_url": ["Download URL field required"]}),
    ({"name": "a", "download_url": 7}, {"download_url": ["Download URL must be a string"]}),
    ({"name": "a", "download_url": "ftp://example.com/a.qcow2"},
     {"download_url": ["Download URL must be http or https"]}),
    ({"name": "a", "download_url": "https://example.com/" + "a" * 2029},
     {"download_url": ["Download URL must be at most 2048 characters"]}),
    ({"name": "a", "download_url": "http://127.0.0.1:8000/a.qcow2"},
     {"download_url": ["Download URL refused: address not allowed: 127.0.0.1 is a loopback "
                       "address"]}),
    ({"name": "a", "download_url": "http://169.254.169.254/latest/meta-data/"},
     {"download_url": ["Download URL refused: address not allowed: 169.254.169.254 is a "
                       "link-local address"]}),
    ({"name": "a", "download_url": "http://[::1]/a.qcow2"},
     {"download_url": ["Download URL refused: address not allowed: ::1 is a loopback "
                       "address"]}),
])
def test_a_refused_body_is_a_400_naming_the_field_and_writes_nothing(
        post_import, bob, fields, errors):
    answer = post_import(**fields)
    assert (answer.status_code, answer.json) == (400, errors)
    assert Image.select().count() == 0
    assert Namespace.select().count() == 0


def test_the_name_is_unique_as_for_uploads(post_import, upload, alice):
    assert upload(alice, name="alpine").status_code == 201
    answer = post_import(name="alpine", download_url="https://example.com/a.qcow2")
    assert (answer.status_code, answer.json) == (400, {"name": ["Name already exists"]})


def test_a_private_address_is_accepted_when_the_operator_allows_it(app, post_import):
    app.config["DOWNLOAD_ALLOW_PRIVATE"] = True
    assert post_import(name="a", download_url="http://10.0.0.5/a.qcow2").status_code == 201
    app.config["DOWNLOAD_ALLOW_PRIVATE"] = False
    app.config["DOWNLOAD_ALLOW_HOSTS"] = frozenset({"10.0.0.6"})
    assert post_import(name="b", download_url="http://10.0.0.6/a.qcow2").status_code == 201


@pytest.mark.parametrize(("raw", "status", "message"), [
    (b"{", 400, "Body is not valid JSON: Expecting property name enclosed in double quotes: "
                "line 1 column 2 (char 1)"),
    (b'["alpine"]', 400, 'JSON body must be an object: {"name", "namespace", "download_url"}'),
    (b'{"name": "' + b"a" * imports.MAX_BODY + b'"}', 413,
     'JSON body larger than 65536 bytes: send {"name", "namespace", "download_url"}'),
])
def test_a_body_that_is_not_one_small_json_object_is_refused(post_import, raw, status, message):
    answer = post_import(raw)
    assert (answer.status_code, answer.json) == (status, {"message": message})


def test_the_source_is_kept_as_given_but_for_the_password(post_import, client, alice, queued):
    """Djinn lowercased the source it showed, and its job panicked on a URL with user and
    password: here the URL is kept as written, the password taken out, and it goes to the
    job alone."""
    url = "https://Alice:S3cret%21@Images.Example.COM/Alpine/Edge.QCOW2?Token=AbC"
    created = post_import(name="alpine", download_url=url)
    assert created.status_code == 201
    row = Image.get_by_id(created.json["id"])
    assert row.download_source == "https://Alice@Images.Example.COM/Alpine/Edge.QCOW2?Token=AbC"
    assert queued[0]["credentials"] == ["Alice", "S3cret!"]
    shown = client.get(f"/images/{row.id}", headers=alice.headers).get_data(as_text=True)
    assert "S3cret" not in shown


# --- the fetch ---------------------------------------------------------------------------

def test_an_import_fetches_the_image_and_then_it_is_served(
        tmp_path, origin, post_import, run_queued, client, alice, store_files):
    image = sample_images.with_data(tmp_path).read_bytes()
    origin.routes["/alpine.qcow2"] = serve(image)
    created = post_import(name="alpine", download_url=origin.url("/alpine.qcow2", "localhost"))
    row = run_queued()
    assert (row.size, row.virtual_size, row.sha256) == (
        len(image), MIB, hashlib.sha256(image).hexdigest())
    assert row.download_error is None
    assert row.download_started_at is not None and row.download_finished_at is not None
    served = get_file(client, alice, created.json["id"])
    assert (served.status_code, served.data) == (200, image)
    assert client.post(f"/images/{row.id}/links", headers=alice.headers).status_code == 201
    assert [name for name in store_files() if not name.startswith(".")] == [
        f"{row.storage_key}.qcow2"]


def failed(app, row):
    """row's download.error, after checking what every failed import must show: finished,
    no file, nothing left in staging, and the 409 that names the error."""
    assert row.download_finished_at is not None
    assert (row.storage_key, row.size, row.sha256) == (None, None, None)
    assert staged_files(app) == []
    return row.download_error


def test_a_404_fails_the_import_naming_the_status(app, origin, post_import, run_queued,
                                                  client, alice):
    """Djinn's job never looked at the status, and stored the error page as the image."""
    post_import(name="alpine", download_url=origin.url("/gone.qcow2", "localhost"))
    row = run_queued()
    assert failed(app, row) == "HTTP 404 Not Found"
    answer = get_file(client, alice, row.id)
    assert (answer.status_code, answer.json) == (
        409, {"message": "Image download failed: HTTP 404 Not Found"})
    link = client.post(f"/images/{row.id}/links", headers=alice.headers)
    assert (link.status_code, link.json) == (409, answer.json)
    assert client.get(f"/images/{row.id}", headers=alice.headers).status_code == 200


def test_garbage_fails_at_its_first_64_kib_without_reading_the_rest(app, origin, import_served):
    """Djinn's job never checked the QCOW2 magic. Here the header is vetted as soon as its
    64 KiB are in, and the other 255 MiB are never asked for."""
    garbage = stream(origin, b"<html>not an image</html>\n" * 4000, total=256 * MIB)
    assert failed(app, import_served(garbage)) == (
        "File not a valid QCOW2 image: not in QCOW2 format (it does not start with the QCOW2 "
        "signature); convert it with `qemu-img convert -O qcow2 in.img out.qcow2`")
    assert origin.done.wait(WAIT)
    assert origin.sent < 64 * MIB


def test_an_image_that_names_a_backing_file_is_refused_by_that_rule(
        app, tmp_path, origin, import_served):
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    assert failed(app, import_served(serve(hostile))).startswith(
        "File not a valid QCOW2 image: the image has a backing file")


def test_a_body_that_stalls_fails_after_the_stall_timeout(app, origin, qcow2_bytes, import_served):
    stalled = stall(origin, start=qcow2_bytes[:HEADER_READ_SIZE], length=len(qcow2_bytes))
    assert failed(app, import_served(stalled)) == "timed out: localhost sent nothing for 0.5 s"


def cut_short(body, chunked):
    """A route that sends half of body and closes: short of its Content-Length, or in a
    chunked answer without its last chunk."""

    def half(handler):
        handler.send_response(200)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        piece = body[:len(body) // 2]
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)

    return half


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_cut_off_before_its_end_fails_as_cut_off(
        app, origin, qcow2_bytes, chunked, import_served):
    assert failed(app, import_served(cut_short(qcow2_bytes, chunked))) == (
        "cut off: the server closed the connection before the end of the body")


def test_a_content_length_past_the_limit_is_refused_before_the_body_is_read(
        app, origin, qcow2_bytes, import_served):
    app.config["MAX_IMAGE_SIZE"] = MIB
    too_long = stream(origin, qcow2_bytes[:HEADER_READ_SIZE], total=MIB + 1)
    assert failed(app, import_served(too_long)) == (
        "too large: the Content-Length of 1048577 bytes is past the limit of 1048576 bytes")


def test_a_body_without_length_is_stopped_at_the_first_byte_past_the_limit(
        app, origin, qcow2_bytes, import_served):
    app.config["MAX_IMAGE_SIZE"] = MIB
    endless = stream(origin, qcow2_bytes[:HEADER_READ_SIZE], total=None)
    assert failed(app, import_served(endless)) == (
        "too large: the body ran past the limit of 1048576 bytes")
    assert origin.done.wait(WAIT)  # the endless body ended: the connection was closed


def test_a_body_of_exactly_the_limit_is_accepted(app, origin, qcow2_bytes, import_served):
    app.config["MAX_IMAGE_SIZE"] = len(qcow2_bytes)
    assert import_served(serve(qcow2_bytes, length=False)).size == len(qcow2_bytes)


def test_the_url_user_and_password_are_sent_as_basic_auth_and_never_shown(
        app, origin, post_import, run_queued, client, alice, qcow2_bytes, caplog):
    """Djinn's job panicked on a URL with credentials. Here they are Basic auth, and the
    password is in no field, no error and no log line."""
    caplog.set_level(logging.DEBUG)
    origin.routes["/private.qcow2"] = basic_auth("robot", "pa:ss@word", serve(qcow2_bytes))
    userinfo = "robot:pa%3Ass%40word@"
    url = origin.url("/private.qcow2", "localhost", userinfo=userinfo)
    post_import(name="good", download_url=url)
    assert run_queued().sha256 == hashlib.sha256(qcow2_bytes).hexdigest()
    post_import(name="bad", download_url=url.replace("/private", "/other"))
    row = run_queued()
    assert failed(app, row) == "HTTP 404 Not Found"
    assert row.download_source == origin.url("/other.qcow2", "localhost", userinfo="robot@")
    listing = client.get("/images", headers=alice.headers).get_data(as_text=True)
    for shown in (listing, caplog.text, row.download_error):
        assert "pa:ss" not in shown and "pa%3Ass" not in shown


def test_a_host_that_resolves_to_loopback_is_refused_and_nothing_reaches_it(
        app, origin, import_served):
    """Djinn had no guard: an import could fetch from the server's own network."""
    app.config["DOWNLOAD_ALLOW_HOSTS"] = frozenset()
    assert failed(app, import_served(serve(b"internal"))) == (
        "address not allowed: localhost (127.0.0.1) is a loopback address")
    assert origin.requests == []


def test_a_redirect_to_a_private_address_is_refused_before_any_request_reaches_it(
        app, origin, import_served):
    with origin_server() as private:
        private.routes["/latest/meta-data"] = serve(b"secrets")
        row = import_served(redirect(private.url("/latest/meta-data")))
        assert failed(app, row) == "address not allowed: 127.0.0.1 is a loopback address"
        assert private.requests == []
    assert origin.hits("/image.qcow2") == 1


def test_a_redirect_to_an_allowed_host_is_followed(origin, import_served, qcow2_bytes):
    origin.routes["/v2/image.qcow2"] = serve(qcow2_bytes)
    assert import_served(redirect(origin.url("/v2/image.qcow2", "localhost"))).size == len(
        qcow2_bytes)


def test_an_import_deleted_while_it_is_fetched_leaves_no_file(
        origin, post_import, queued, app, qcow2_bytes, store_files):
    def delete_then_serve(handler):
        Image.delete().execute()
        db.close()  # this server thread's own connection
        serve(qcow2_bytes)(handler)

    origin.routes["/image.qcow2"] = delete_then_serve
    url = origin.url("/image.qcow2", "localhost")
    image_id = post_import(name="a", download_url=url).json["id"]
    imports.job_handler(app.extensions["storage"], app.config)(queued.pop())
    assert Image.get_or_none(Image.id == image_id) is None
    assert [name for name in store_files() if not name.startswith(".")] == []
    assert staged_files(app) == []


def test_a_pending_import_can_be_deleted_and_its_job_then_does_nothing(
        origin, post_import, run_queued, client, alice):
    url = origin.url("/image.qcow2", "localhost")
    image_id = post_import(name="a", download_url=url).json["id"]
    assert client.delete(f"/images/{image_id}", headers=alice.headers).status_code == 204
    with pytest.raises(Image.DoesNotExist):
        run_queued()
    assert origin.requests == []


def test_a_finished_import_run_again_changes_nothing(origin, post_import, queued, app,
                                                     qcow2_bytes):
    """A job taken over after its worker died runs again; the import is done already."""
    origin.routes["/image.qcow2"] = serve(qcow2_bytes)
    post_import(name="a", download_url=origin.url("/image.qcow2", "localhost"))
    handler = imports.job_handler(app.extensions["storage"], app.config)
    handler(queued[0])
    first = Image.get_by_id(queued[0]["image_id"])
    handler(queued[0])
    assert Image.get_by_id(first.id).storage_key == first.storage_key
    assert origin.hits("/image.qcow2") == 1


# --- restarts ----------------------------------------------------------------------------

def pending_import(account, name, **columns):
    """An import row as the POST leaves it (and as a killed worker leaves it, started)."""
    return Image.create(author=account.user, user=account.user, name=name,
                        download_source="https://example.com/a.qcow2",
                        download_created_at=utcnow(), **columns)


def test_at_start_an_import_that_no_job_will_run_fails_as_interrupted(alice, upload):
    cut_off = pending_import(alice, "cut-off", download_started_at=utcnow())
    never_started = pending_import(alice, "never-started")
    still_queued = pending_import(alice, "queued")
    done = pending_import(alice, "failed", download_error="HTTP 404 Not Found",
                          download_finished_at=utcnow())
    uploaded = upload(alice, name="uploaded").json["id"]
    assert imports.recover_imports(lambda: {still_queued.id}) == 2
    for row in (cut_off, never_started):
        again = Image.get_by_id(row.id)
        assert (again.download_error, again.download_finished_at is not None) == (
            "interrupted", True)
    assert Image.get_by_id(still_queued.id).download_finished_at is None
    assert Image.get_by_id(done.id).download_error == "HTTP 404 Not Found"
    assert Image.get_by_id(uploaded).download_finished_at is None


def test_a_restart_fails_what_was_cut_off_and_its_file_answers_409(
        make_app, app, alice, client):
    row = pending_import(alice, "cut-off", download_started_at=utcnow())
    restarted = make_app()  # prepare_instance, as at every start
    answer = get_file(restarted.test_client(), alice, row.id)
    assert (answer.status_code, answer.json) == (
        409, {"message": "Image download failed: interrupted"})


# A worker's thread running an import, in a process of its own that the test can kill.
IMPORT_WORKER = r"""
import sys

import imports
from app import create_app

database, storage, instance, image_id = sys.argv[1:]
app = create_app({"DATABASE_URL": database, "STORAGE_URL": storage, "SECRET_KEY": KEY,
                  "DOWNLOAD_ALLOW_HOSTS": frozenset({"localhost"})},
                 instance_path=instance, prepare=False)
imports.run_import(int(image_id), app.extensions["storage"], app.config)
""".replace("KEY", repr(TEST_SECRET_KEY))


@pytest.mark.slow
def test_an_import_whose_process_is_killed_fails_as_interrupted_at_the_restart(
        make_app, app, database_url, tmp_path, origin, post_import, client, alice, qcow2_bytes):
    """kill -9 in the middle of the transfer: the restart removes the half-written file
    and fails the import with "interrupted" (with jobs.py, a lease takeover runs it again)."""
    asked = threading.Event()
    stalled = stall(origin, start=qcow2_bytes[:2 * HEADER_READ_SIZE], length=len(qcow2_bytes))
    origin.routes["/image.qcow2"] = lambda handler: (asked.set(), stalled(handler))
    url = origin.url("/image.qcow2", "localhost")
    image_id = post_import(name="a", download_url=url).json["id"]
    staging = app.extensions["storage"].staging_folder
    worker = subprocess.Popen([sys.executable, "-c", IMPORT_WORKER, database_url,
                               app.config["STORAGE_URL"], str(tmp_path / "worker"), str(image_id)],
                              cwd=ROOT)
    try:
        assert asked.wait(WAIT)  # the staged file is made before the request is sent
        assert [name for name in os.listdir(staging) if name.endswith(".part")]
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(WAIT)
    assert Image.get_by_id(image_id).download_started_at is not None
    restarted = make_app()  # prepare_instance, as at every start
    assert files_under(staging) == []
    answer = get_file(restarted.test_client(), alice, image_id)
    assert (answer.status_code, answer.json) == (
        409, {"message": "Image download failed: interrupted"})


# --- end to end --------------------------------------------------------------------------

def test_an_import_through_gunicorn_is_answered_at_once_and_then_downloadable(
        tmp_path, qcow2_bytes):
    """The POST through the real server; the fetch run here against the same instance, as
    a job of the server's workers will run it."""
    from app import create_app

    with origin_server() as origin, server_with_account(
            tmp_path / "live", "alice", {"DOWNLOAD_ALLOW_HOSTS": "localhost"}) as server:
        origin.routes["/alpine.qcow2"] = serve(qcow2_bytes)
        url = origin.url("/alpine.qcow2", "localhost")
        created = server_request(server, "POST", "/images", json.dumps(
            {"name": "alpine", "namespace": "djinn", "download_url": url}).encode(),
            {"Content-Type": "application/json"})
        assert created[0] == 201
        image_id = json.loads(created[1])["id"]
        assert server_request(server, "GET", f"/images/{image_id}", None,
                              {"Accept": "application/octet-stream"})[0] == 409
        app = create_app({"DOWNLOAD_ALLOW_HOSTS": frozenset({"localhost"})},
                         instance_path=str(server.instance), prepare=False)
        imports.run_import(image_id, app.extensions["storage"], app.config)
        assert server_request(server, "GET", f"/images/{image_id}", None,
                              {"Accept": "application/octet-stream"}) == (200, qcow2_bytes)


def server_request(server, method, path, body, headers):
    """(status, body) of one request to the live server with its account's token."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + path, data=body, method=method,
                                     headers={**server.headers, **headers})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()

