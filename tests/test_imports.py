"""Imports from a URL (POST /images with a JSON body): the checks of the POST, the fetch
under every rule of an upload against real servers on loopback, the quotas, the 409 until
the file is in, the job that runs it (jobs.py), its `downloaded` webhook event, and what a
restart or a killed worker does with an import that was cut off.

The POST queues a job in the Job table; `run_queued` runs the due jobs here with
jobs.run_due_jobs(), as a worker's job thread would. The end-to-end tests leave that to
the job threads of a real gunicorn.
"""

import hashlib
import json
import logging
import os
import signal
import threading
import time

import pytest
import sample_images
from conftest import files_under, server_with_account
from origin_servers import (
    WAIT,
    basic_auth,
    origin_server,
    redirect,
    serve,
    stall,
    stream,
)
from test_audit import lines_of, token_id, without_time
from test_metrics import figure, grown, scrape
from test_webhooks import SECRET, Receiver

import imports
import jobs
from config import load_config
from models import Image, Job, Namespace, db, utcnow
from namespaces import ensure_namespace
from qcow2 import HEADER_READ_SIZE
from quotas import set_quota

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


def queued():
    """The payloads of the import jobs in the Job table, oldest first."""
    return [json.loads(job.payload) for job in
            Job.select().where(Job.kind == imports.JOB_KIND).order_by(Job.id)]


@pytest.fixture
def run_queued(app):
    """Run the due jobs, as a worker's job thread would; return the row of the image that
    the last queued import job was for."""

    def run():
        last = queued()[-1]
        assert jobs.run_due_jobs() >= 1
        return Image.get_by_id(last["image_id"])

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
        post_import, client, alice):
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
    assert queued() == [{"image_id": body["id"], "credentials": None,
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
    # JSON's "\ud800" is a lone surrogate, no text: the URL's was a 500 (UTF-8 refused it).
    ({"name": "a", "download_url": "https://example.com/\ud800.qcow2"},
     {"download_url": ["Download URL must not hold a lone surrogate (\\ud800-\\udfff)"]}),
    ({"name": "a\udfff", "download_url": "https://example.com/a.qcow2"},
     {"name": ["Name must not hold a lone surrogate (\\ud800-\\udfff)"]}),
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
    # Deeper than Python's JSON parser goes: its RecursionError was a 500.
    (b"[" * 30000 + b"]" * 30000, 400,
     "Body is not valid JSON: arrays or objects nested too deeply"),
    (b'{"name": "' + b"a" * imports.MAX_BODY + b'"}', 413,
     'JSON body larger than 65536 bytes: send {"name", "namespace", "download_url"}'),
])
def test_a_body_that_is_not_one_small_json_object_is_refused(post_import, raw, status, message):
    answer = post_import(raw)
    assert (answer.status_code, answer.json) == (status, {"message": message})


def test_the_source_is_kept_as_given_but_for_the_password(post_import, client, alice):
    """Djinn lowercased the source it showed, and its job panicked on a URL with user and
    password: here the URL is kept as written, the password taken out, and it goes to the
    job alone."""
    url = "https://Alice:S3cret%21@Images.Example.COM/Alpine/Edge.QCOW2?Token=AbC"
    created = post_import(name="alpine", download_url=url)
    assert created.status_code == 201
    row = Image.get_by_id(created.json["id"])
    assert row.download_source == "https://Alice@Images.Example.COM/Alpine/Edge.QCOW2?Token=AbC"
    assert queued()[0]["credentials"] == ["Alice", "S3cret!"]
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
    # Peewee's own DEBUG lines show the values of every SQL statement (the job's payload
    # as it is written, a webhook's secret alike): a developer's tool, off unless turned on.
    logged = "\n".join(record.getMessage() for record in caplog.records
                       if record.name.split(".")[0] != "peewee")
    for shown in (listing, logged, row.download_error):
        assert "pa:ss" not in shown and "pa%3Ass" not in shown
    assert Job.select().count() == 0  # the jobs that held the password are done, and gone


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
        origin, post_import, app, qcow2_bytes, store_files):
    def delete_then_serve(handler):
        Image.delete().execute()
        db.close()  # this server thread's own connection
        serve(qcow2_bytes)(handler)

    origin.routes["/image.qcow2"] = delete_then_serve
    url = origin.url("/image.qcow2", "localhost")
    image_id = post_import(name="a", download_url=url).json["id"]
    assert jobs.run_due_jobs() == 1
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


def test_a_finished_import_run_again_changes_nothing(origin, post_import, app,
                                                     qcow2_bytes):
    """A job taken over after its worker died runs again; the import is done already."""
    origin.routes["/image.qcow2"] = serve(qcow2_bytes)
    post_import(name="a", download_url=origin.url("/image.qcow2", "localhost"))
    handler = imports.job_handler(app.extensions["storage"], app.config)
    [payload] = queued()
    handler(payload)
    first = Image.get_by_id(payload["image_id"])
    handler(payload)
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


def import_jobs():
    """The import jobs in the Job table, oldest first."""
    return list(Job.select().where(Job.kind == imports.JOB_KIND).order_by(Job.id))


def test_a_start_keeps_the_imports_a_job_will_run_and_fails_the_others(
        make_app, app, alice, post_import):
    """`queued` waits for a job thread and `running` is held by a live worker: both stay
    pending. `lost` has no job left, and the job of `given-up` failed before it could
    tell its import: both fail as interrupted, and their file answers 409 saying so."""
    ids = {name: post_import(name=name, download_url=f"https://example.com/{name}.qcow2"
                             ).json["id"] for name in ("queued", "running", "given-up")}
    _, running, given_up = import_jobs()
    Job.update(claimed_by="elsewhere:1234:alive", claimed_until=jobs.database_now() + 3600,
               attempts=1).where(Job.id == running.id).execute()
    Job.update(state=jobs.FAILED).where(Job.id == given_up.id).execute()
    ids["lost"] = pending_import(alice, "lost", download_started_at=utcnow()).id
    restarted = make_app()  # prepare_instance, as at every start
    errors = {name: Image.get_by_id(image_id).download_error for name, image_id in ids.items()}
    assert errors == {"queued": None, "running": None, "given-up": "interrupted",
                      "lost": "interrupted"}
    answer = get_file(restarted.test_client(), alice, ids["lost"])
    assert (answer.status_code, answer.json) == (
        409, {"message": "Image download failed: interrupted"})


def test_an_import_whose_last_try_never_finished_fails_and_its_job_keeps_no_password(
        app, post_import):
    """Its worker died in every try, so jobs.py fails the job instead of running it again:
    the import fails as interrupted, and the failed job (kept for `job list`) has lost the
    URL's password."""
    url = "https://robot:hunter2@example.com/a.qcow2"
    image_id = post_import(name="a", download_url=url).json["id"]
    tries = jobs.KINDS[imports.JOB_KIND].max_attempts
    Job.update(attempts=tries, claimed_by="elsewhere:1234:dead", claimed_until=0).execute()
    assert jobs.run_due_jobs() == 1
    [job] = import_jobs()
    assert (job.state, job.last_error) == (
        "failed", f"try {tries} did not finish (its worker stopped)")
    assert json.loads(job.payload) == {"image_id": image_id, "credentials": None,
                                       "base_url": "http://localhost"}
    row = Image.get_by_id(image_id)
    assert (row.download_error, row.download_finished_at is not None) == ("interrupted", True)


def slow_first(origin, body, started):
    """A route that sends its first request body's first 128 KiB, sets started, and then
    16 bytes at a time, never quite to the end, until the client goes away (or the origin
    closes); a later request gets the whole body at once."""
    asked = []

    def route(handler):
        asked.append(handler.path)
        if len(asked) > 1:
            return serve(body)(handler)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:2 * HEADER_READ_SIZE])
        handler.wfile.flush()
        started.set()
        for offset in range(2 * HEADER_READ_SIZE, len(body) - 32, 16):
            if origin.release.wait(0.05):
                return None
            handler.wfile.write(body[offset:offset + 16])
            handler.wfile.flush()
        return None

    return route


def test_an_import_cut_short_by_its_process_stopping_is_handed_back_and_runs_again(
        app, origin, post_import, job_threads, qcow2_bytes):
    """A worker that exits (a deploy, a restart) stops its job threads: the transfer is
    cut at once, the staged file removed, and the job handed back, its try not counted,
    to run again from the start wherever job threads run."""
    started = threading.Event()
    origin.routes["/image.qcow2"] = slow_first(origin, qcow2_bytes, started)
    job_threads(app)
    image_id = post_import(name="a", download_url=origin.url("/image.qcow2", "localhost")
                           ).json["id"]
    assert started.wait(WAIT)
    jobs.stop_job_threads(timeout=WAIT)
    [job] = import_jobs()
    assert (job.state, job.attempts, job.claimed_by) == ("pending", 0, None)
    assert Image.get_by_id(image_id).download_finished_at is None
    assert staged_files(app) == []
    assert jobs.run_due_jobs() == 1
    assert Image.get_by_id(image_id).sha256 == hashlib.sha256(qcow2_bytes).hexdigest()
    assert origin.hits("/image.qcow2") == 2


def test_a_transfer_that_takes_longer_than_its_time_fails(
        app, origin, qcow2_bytes, import_served, monkeypatch):
    """However slowly a server sends (never stalling), an import ends: a transfer gets
    MAX_IMAGE_SIZE at 1 MiB/s, an hour at least (here, 0.3 s at least)."""
    monkeypatch.setattr(imports, "MIN_TRANSFER_SECONDS", 0.3)
    app.config.update(MAX_IMAGE_SIZE=len(qcow2_bytes), DOWNLOAD_STALL_TIMEOUT=WAIT)
    row = import_served(slow_first(origin, qcow2_bytes, threading.Event()))
    assert failed(app, row) == "timed out: the transfer took more than 0.3 s"


# --- quotas ------------------------------------------------------------------------------

def test_a_content_length_past_the_quota_fails_the_import_before_the_body_is_read(
        app, alice, origin, qcow2_bytes, import_served):
    """The row counts as one image from the POST; its bytes are checked as soon as the
    origin says how many there are."""
    set_quota(alice.user, max_bytes=MIB)
    too_many = stream(origin, qcow2_bytes[:HEADER_READ_SIZE], total=256 * MIB)
    assert failed(app, import_served(too_many)) == (
        "Quota exceeded: user alice may keep 1048576 bytes; 0 in use, and this image is "
        "268435456 bytes")
    assert origin.done.wait(WAIT)
    assert origin.sent < 64 * MIB


def test_a_namespace_quota_counts_an_import_into_its_children(
        app, alice, origin, qcow2_bytes, post_import, run_queued):
    set_quota(ensure_namespace(alice.user, ["team"]), max_bytes=MIB)
    origin.routes["/image.qcow2"] = stream(origin, qcow2_bytes[:HEADER_READ_SIZE],
                                           total=2 * MIB)
    post_import(name="a", namespace="team/sub", download_url=origin.url("/image.qcow2",
                                                                        "localhost"))
    assert failed(app, run_queued()) == (
        "Quota exceeded: namespace team@alice may keep 1048576 bytes; 0 in use, and this "
        "image is 2097152 bytes")


def test_a_body_without_length_is_checked_against_the_quota_when_recorded(
        app, alice, origin, qcow2_bytes, import_served, store_files):
    set_quota(alice.user, max_bytes=len(qcow2_bytes) - 1)
    row = import_served(serve(qcow2_bytes, length=False))
    assert failed(app, row) == (
        f"Quota exceeded: user alice may keep {len(qcow2_bytes) - 1} bytes; 0 in use, and "
        f"this image is {len(qcow2_bytes)} bytes")
    assert [name for name in store_files() if not name.startswith(".")] == []


def test_an_import_that_fills_the_quota_exactly_is_stored_counting_itself_once(
        alice, qcow2_bytes, import_served):
    set_quota(alice.user, max_bytes=len(qcow2_bytes), max_images=1)
    row = import_served(serve(qcow2_bytes))
    assert (row.download_error, row.size) == (None, len(qcow2_bytes))


# --- webhooks ----------------------------------------------------------------------------

def test_the_namespaces_webhooks_hear_when_an_import_ends_well_or_not(
        origin, post_import, runner, client, alice, qcow2_bytes):
    team = Receiver()
    try:
        runner.invoke(args=["namespace", "create", "team", "--owner", "alice"])
        runner.invoke(args=["webhook", "create", "team@alice", team.url, "--secret", SECRET])
        origin.routes["/good.qcow2"] = serve(qcow2_bytes)
        for name in ("good", "gone"):
            post_import(name=name, namespace="team",
                        download_url=origin.url(f"/{name}.qcow2", "localhost"))
        assert jobs.run_due_jobs() == 6  # the two imports, then four deliveries
        sent = team.wait_for(4)
    finally:
        team.close()
    assert all(request["signed"] for request in sent)
    events = [json.loads(request["body"]) for request in sent]
    downloaded = {event["image"]["name"]: event["image"] for event in events
                  if event["action"] == "downloaded"}
    good = client.get(f"/images/{downloaded['good']['id']}", headers=alice.headers).json
    assert downloaded["good"] == good and good["sha256"] is not None
    assert downloaded["gone"]["download"]["error"] == "HTTP 404 Not Found"
    assert sorted(event["action"] for event in events) == [
        "created", "created", "downloaded", "downloaded"]


# --- metrics and the audit log ----------------------------------------------------------

def imports_counted(found):
    """The imports counted in a grown() of /metrics, by outcome."""
    return {labels[0][1]: value for (name, labels), value in found.items()
            if name == "imagestore_imports_total"}


def test_imports_are_counted_by_outcome_and_a_stored_one_joins_the_stored_images(
        app, make_app, client, alice, bob, origin, qcow2_bytes, post_import):
    app.config["MAX_IMAGE_SIZE"] = MIB
    set_quota(bob.user, max_bytes=1000)
    origin.routes.update({
        "/good.qcow2": serve(qcow2_bytes),
        "/garbage.qcow2": serve(b"<html>not an image</html>\n" * 4000),
        "/huge.qcow2": stream(origin, qcow2_bytes[:HEADER_READ_SIZE], total=MIB + 1),
        "/elsewhere.qcow2": redirect(origin.url("/good.qcow2")),  # to 127.0.0.1
    })
    before = scrape(client)
    for name in ("good", "gone", "garbage", "huge", "elsewhere"):
        post_import(name=name, download_url=origin.url(f"/{name}.qcow2", "localhost"))
    post_import(account=bob, name="big", download_url=origin.url("/good.qcow2", "localhost"))
    pending_import(alice, "lost", download_started_at=utcnow())
    assert jobs.run_due_jobs() == 6
    stored = grown(before, scrape(client))
    assert (figure(stored, "imagestore_stored_images"),
            figure(stored, "imagestore_stored_image_bytes")) == (1, len(qcow2_bytes))
    make_app()  # a start: the lost one fails as interrupted
    assert imports_counted(grown(before, scrape(client))) == {
        "stored": 1, "http_error": 1, "not_qcow2": 1, "too_large": 1, "refused_address": 1,
        "quota": 1, "interrupted": 1}


def test_an_import_is_audited_when_posted_and_when_it_ends_never_with_the_password(
        make_app, make_account, tmp_path, origin, qcow2_bytes):
    path = tmp_path / "audit.log"
    app = make_app(AUDIT_LOG=str(path), DOWNLOAD_ALLOW_HOSTS=frozenset({"localhost"}))
    client, alice = app.test_client(), make_account("alice")
    origin.routes["/alpine.qcow2"] = basic_auth("robot", "hunter2", serve(qcow2_bytes))
    ids = {}
    for name in ("alpine", "gone"):
        url = origin.url(f"/{name}.qcow2", "localhost", userinfo="robot:hunter2@")
        ids[name] = client.post("/images", headers=alice.headers, json={
            "name": name, "namespace": "djinn", "download_url": url}).json["id"]
    assert jobs.run_due_jobs() == 2
    row = Image.get_by_id(ids["alpine"])
    by_alice = {"user": "alice", "token_id": token_id(alice), "client": "127.0.0.1"}
    by_the_import = {"user": "alice", "token_id": None, "client": None}

    def image(name, sha256=None, size=None):
        return {"image_id": ids[name], "name": name, "namespace": "djinn@alice",
                "sha256": sha256, "bytes": size,
                "source": origin.url(f"/{name}.qcow2", "localhost")}

    assert without_time(lines_of(path)) == [
        {"action": "import", **by_alice, **image("alpine"), "status": 201},
        {"action": "import", **by_alice, **image("gone"), "status": 201},
        {"action": "import", **by_the_import, **image("alpine", row.sha256, row.size),
         "status": None, "outcome": "stored", "error": None},
        {"action": "import", **by_the_import, **image("gone"), "status": None,
         "outcome": "http_error", "error": "HTTP 404 Not Found"},
    ]
    assert "hunter2" not in path.read_text()


# --- end to end --------------------------------------------------------------------------

def server_request(server, method, path, body=None, headers=None):
    """(status, body) of one request to the live server with its account's token."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + path, data=body, method=method,
                                     headers={**server.headers, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post_to(server, url, name="alpine"):
    """POST an import of url to the live server; the image's id."""
    status, body = server_request(server, "POST", "/images", json.dumps(
        {"name": name, "namespace": "djinn", "download_url": url}).encode(),
        {"Content-Type": "application/json"})
    assert status == 201, body
    return json.loads(body)["id"]


def finished(server, image_id):
    """The image's JSON once its download has finished (done by the server's job threads),
    polled with a generous deadline."""
    deadline = time.monotonic() + WAIT
    while True:
        status, body = server_request(server, "GET", f"/images/{image_id}")
        image = json.loads(body)
        if status != 200 or image["download"]["finished_at"] is not None:
            return image
        assert time.monotonic() < deadline, f"import {image_id} not done in {WAIT} s"
        time.sleep(0.05)  # the JSON is all there is to watch from outside


def disk_of(server, image_id):
    return server_request(server, "GET", f"/images/{image_id}", None,
                          {"Accept": "application/octet-stream"})


def test_an_import_through_gunicorn_is_answered_at_once_and_then_downloadable(
        tmp_path, qcow2_bytes):
    """The POST through the real server, then its workers' job threads fetch the file."""
    release = threading.Event()
    with origin_server() as origin, server_with_account(
            tmp_path / "live", "alice", {"DOWNLOAD_ALLOW_HOSTS": "localhost"}) as server:
        # The file waits until the 409 of an import still running has been seen.
        origin.routes["/alpine.qcow2"] = lambda handler: (release.wait(WAIT),
                                                          serve(qcow2_bytes)(handler))
        image_id = post_to(server, origin.url("/alpine.qcow2", "localhost"))
        status, body = disk_of(server, image_id)
        assert (status, json.loads(body)) == (409, {"message": "Image not downloaded yet"})
        release.set()
        image = finished(server, image_id)
        assert (image["download"]["error"], image["sha256"]) == (
            None, hashlib.sha256(qcow2_bytes).hexdigest())
        assert disk_of(server, image_id) == (200, qcow2_bytes)
        assert server.flask("job", "list") == ""


def test_an_import_whose_worker_is_killed_is_taken_over_and_finishes(tmp_path, qcow2_bytes):
    """kill -9 of the (one) worker in the middle of the transfer: gunicorn starts another,
    which removes what the dead one left staged as it starts, takes the job over once the
    dead one's lease has lapsed, and runs the import again from the start."""
    started = threading.Event()
    # One worker of one job thread: nothing but the takeover can run the import again.
    env = {"DOWNLOAD_ALLOW_HOSTS": "localhost", "WEB_CONCURRENCY": "1", "JOB_THREADS": "1",
           "JOB_LEASE": "2", "JOB_POLL_INTERVAL": "1"}
    with origin_server() as origin, server_with_account(tmp_path / "live", "alice",
                                                        env) as server:
        origin.routes["/alpine.qcow2"] = slow_first(origin, qcow2_bytes, started)
        image_id = post_to(server, origin.url("/alpine.qcow2", "localhost"))
        assert started.wait(WAIT)
        staging = server.instance / "images" / ".incoming"
        [worker] = server.worker_pids()
        assert [name for name in os.listdir(staging) if name.startswith(f"{worker}-")]
        os.kill(worker, signal.SIGKILL)
        image = finished(server, image_id)
        assert (image["download"]["error"], image["sha256"]) == (
            None, hashlib.sha256(qcow2_bytes).hexdigest())
        assert disk_of(server, image_id) == (200, qcow2_bytes)
        assert files_under(staging) == []
        assert server.flask("job", "list") == ""
    assert origin.hits("/alpine.qcow2") == 2
    assert "the claim of" in server.log_text() and "taking it over" in server.log_text()
