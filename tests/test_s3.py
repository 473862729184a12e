"""Image files in an S3-compatible store: moto_server on loopback, spoken to over HTTP."""

import hashlib
import os
import urllib.error
import urllib.request
from urllib.parse import parse_qsl, urlsplit

import pytest
from conftest import start_server, stop_server

from models import Image
from s3storage import S3Storage
from storage import MiB, StorageUnavailable

DISK = {"Accept": "application/octet-stream"}


@pytest.fixture
def app(s3_app):
    """Every fixture built on `app` (client, upload, make_account) uses the S3 store here."""
    return s3_app


@pytest.fixture
def store(app):
    return app.extensions["storage"]


def fetch(url, headers=None, method="GET"):
    """(status, headers, body) of a plain HTTP request, as any client would make it."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_upload_goes_to_the_bucket_and_nothing_stays_local(app, store, s3_bucket, alice,
                                                           upload, qcow2_bytes):
    created = upload(alice, name="go-dev")
    assert created.status_code == 201, created.json
    key = Image.get_by_id(created.json["id"]).storage_key
    assert s3_bucket.objects() == {f"images/{key}.qcow2": len(qcow2_bytes)}
    assert os.listdir(store.staging_folder) == []
    assert created.json["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()


def test_download_redirects_to_a_presigned_url(client, s3_server, alice, upload,
                                               qcow2_bytes):
    image = upload(alice, name="go-dev").json
    got = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert got.status_code == 302
    assert got.headers["Vary"] == "Accept"
    location = got.headers["Location"]
    assert location.startswith(s3_server.endpoint + "/")
    # The store is asked, in the signed query, to answer with the download headers
    # (moto ignores these; AWS, MinIO and Ceph honour them).
    query = dict(parse_qsl(urlsplit(location).query))
    assert query["response-content-disposition"] == 'attachment; filename="go-dev.qcow2"'
    assert query["response-content-type"] == "application/octet-stream"
    assert "X-Amz-Signature" in query
    status, _, body = fetch(location)
    assert (status, body) == (200, qcow2_bytes)
    # Range requests now go to the store itself.
    status, _, body = fetch(location, {"Range": "bytes=100-199"})
    assert (status, body) == (206, qcow2_bytes[100:200])


def test_head_is_answered_here_with_the_download_headers(client, alice, upload, qcow2_bytes):
    image = upload(alice).json
    got = client.head(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert got.status_code == 200
    assert "Location" not in got.headers
    assert got.headers["Content-Length"] == str(len(qcow2_bytes))
    assert got.headers["ETag"] == f'"{image["sha256"]}"'
    assert got.data == b""


def test_json_answer_is_not_redirected(client, alice, upload):
    image = upload(alice, name="plain").json
    got = client.get(f"/images/{image['id']}", headers=alice.headers)
    assert got.status_code == 200
    assert got.json["name"] == "plain"


def test_signed_link_redirects_too(client, alice, upload, qcow2_bytes):
    image = upload(alice, name="linked").json
    link = client.post(f"/images/{image['id']}/links", headers=alice.headers).json["url"]
    got = client.get(link.removeprefix("http://localhost"))
    assert got.status_code == 302
    location = got.headers["Location"]
    query = dict(parse_qsl(urlsplit(location).query))
    assert query["response-content-disposition"] == 'attachment; filename="linked.qcow2"'
    status, _, body = fetch(location)
    assert (status, body) == (200, qcow2_bytes)


def test_stream_through_when_redirects_are_off(make_app, s3_bucket, alice, qcow2_bytes):
    app = make_app(STORAGE_URL=f"s3://{s3_bucket.name}/images", S3_REDIRECT_DOWNLOADS=False)
    client = app.test_client()
    image = client.post("/images?name=through", headers=alice.headers, data=qcow2_bytes).json
    got = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert got.status_code == 200
    assert got.data == qcow2_bytes
    assert got.headers["ETag"] == f'"{image["sha256"]}"'
    assert got.headers["Content-Disposition"] == 'attachment; filename="through.qcow2"'
    unchanged = client.get(f"/images/{image['id']}", headers={
        **alice.headers, **DISK, "If-None-Match": f'"{image["sha256"]}"'})
    assert unchanged.status_code == 304


def test_delete_removes_the_object(client, s3_bucket, alice, upload):
    image = upload(alice).json
    assert len(s3_bucket.objects()) == 1
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204
    assert s3_bucket.objects() == {}
    assert client.get(f"/images/{image['id']}", headers=alice.headers).status_code == 404


def test_delete_when_the_store_fails_is_still_a_delete(client, store, s3_bucket, alice,
                                                      upload, runner, app):
    image = upload(alice).json
    real_bucket, store.bucket = store.bucket, "no-such-bucket-here"  # the store now refuses
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204
    assert client.get(f"/images/{image['id']}", headers=alice.headers).status_code == 404
    store.bucket = real_bucket
    assert len(s3_bucket.objects()) == 1  # an orphan, for the sweep
    with app.app_context():
        runner.invoke(args=["sweep", "--min-age", "0"])
    assert s3_bucket.objects() == {}


def test_refused_upload_leaves_no_object_no_row_no_staged_file(store, s3_bucket, alice,
                                                               upload):
    refused = upload(alice, data=b"not a qcow2 image" * 100)
    assert refused.status_code == 400
    assert "file" in refused.json
    assert s3_bucket.objects() == {}
    assert Image.select().count() == 0
    assert os.listdir(store.staging_folder) == []


def test_failed_put_leaves_no_row(make_app, s3_bucket, alice, qcow2_bytes):
    app = make_app(STORAGE_URL="s3://no-such-bucket-here/images")
    client = app.test_client()
    failed = client.post("/images?name=lost", headers=alice.headers, data=qcow2_bytes)
    assert failed.status_code == 503
    assert failed.json == {"message": "Image store unavailable, try again later"}
    assert Image.select().count() == 0
    assert os.listdir(app.extensions["storage"].staging_folder) == []
    assert client.get("/healthz").status_code == 503


def test_healthz_checks_the_bucket(client):
    got = client.get("/healthz")
    assert (got.status_code, got.json) == (200, {"status": "ok"})


def test_missing_object_is_a_json_error(make_app, s3_bucket, alice, qcow2_bytes):
    app = make_app(STORAGE_URL=f"s3://{s3_bucket.name}/images", S3_REDIRECT_DOWNLOADS=False)
    client = app.test_client()
    image = client.post("/images?name=gone", headers=alice.headers, data=qcow2_bytes).json
    app.extensions["storage"].delete(Image.get_by_id(image["id"]).storage_key)
    got = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert got.status_code == 500
    assert got.json == {"message": "Internal Server Error"}


def test_sweep_removes_objects_without_a_row(app, store, s3_bucket, alice, upload, runner):
    kept = upload(alice).json
    with store.staging() as staged:
        staged.file.write(b"left by a crash between put and commit")
        orphan = store.put(staged)
    assert len(s3_bucket.objects()) == 2
    with app.app_context():  # as `flask` gives its commands
        result = runner.invoke(args=["sweep", "--min-age", "0"])
    assert result.exit_code == 0, result.output
    assert "1 orphan files" in result.output
    key = Image.get_by_id(kept["id"]).storage_key
    assert set(s3_bucket.objects()) == {f"images/{key}.qcow2"}
    assert store.keys() == [key] != [orphan]


def test_large_file_goes_up_in_parts(s3_bucket, tmp_path):
    store = S3Storage(s3_bucket.name, "big", tmp_path / "staging", part_size=5 * MiB)
    data = os.urandom(11 * MiB)
    with store.staging() as staged:
        staged.file.write(data)
        key = store.put(staged)
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=store.object_name(key))
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert head["ContentLength"] == len(data)
    assert s3_bucket.unfinished_uploads() == []
    # Only put's intent is left, for the caller to settle once the row is committed.
    assert os.listdir(store.staging_folder) == [f"{os.getpid()}-{key}.intent"]
    store.intents.settle(key)
    assert os.listdir(store.staging_folder) == []
    assert store.keys() == [key]
    reader = store.open(key)
    reader.seek(6 * MiB)
    rest = b"".join(iter(lambda: reader.read(8192), b""))
    reader.close()
    assert rest == data[6 * MiB:]


def test_keys_are_only_those_under_the_prefix(s3_bucket, tmp_path):
    ours = S3Storage(s3_bucket.name, "ours", tmp_path / "a")
    theirs = S3Storage(s3_bucket.name, "ours-too", tmp_path / "b")
    for store in (ours, theirs):
        with store.staging() as staged:
            staged.file.write(b"x")
            store.put(staged)
    assert len(ours.keys()) == len(theirs.keys()) == 1
    assert ours.keys() != theirs.keys()
    assert ours.keys(older_than=3600) == []


def test_unreachable_store_is_storage_unavailable(s3_bucket, tmp_path):
    store = S3Storage("no-such-bucket-here", "", tmp_path / "staging")
    with pytest.raises(StorageUnavailable):
        store.check_writable()
    with store.staging() as staged, pytest.raises(StorageUnavailable):
        store.put(staged)
    assert os.listdir(store.staging_folder) == []


def test_gunicorn_streams_ranges_through(s3_bucket, tmp_path, qcow2_bytes):
    """Stream-through under the real server: a Range is served from a ranged GET."""
    env = {"STORAGE_URL": f"s3://{s3_bucket.name}/live", "S3_REDIRECT_DOWNLOADS": "0",
           "WEB_CONCURRENCY": "1", **{k: os.environ[k] for k in os.environ
                                      if k.startswith("AWS_")}}
    server = start_server(tmp_path / "live", env)
    try:
        auth = server.account("carol")
        request = urllib.request.Request(f"{server.url}/images?name=live", data=qcow2_bytes,
                                         headers=auth, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            url = response.headers["Location"]
        status, headers, body = fetch(url, {**auth, **DISK, "Range": "bytes=1000-1999"})
        assert (status, body) == (206, qcow2_bytes[1000:2000])
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(qcow2_bytes)}"
        status, _, body = fetch(url, {**auth, **DISK})
        assert (status, body) == (200, qcow2_bytes)
    finally:
        stop_server(server)
