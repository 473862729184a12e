"""Several machines: two gunicorn instances, each with its own instance folder, sharing
one PostgreSQL and one S3 endpoint, as behind a load balancer.

Needs PostgreSQL (TEST_DATABASE_URL; .ci/run sets it) and starts moto_server.
"""

import json
import secrets
import threading
import urllib.error
import urllib.request

import pytest
from conftest import needs_postgres, start_server, stop_server

pytestmark = [needs_postgres, pytest.mark.slow]
DISK = {"Accept": "application/octet-stream"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def call(method, url, headers=None, data=None):
    """(status, headers, body) without following redirects."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def download(url):
    """Follow a presigned URL as a client does: no Authorization goes to the store."""
    status, _, body = call("GET", url)
    assert status == 200
    return body


@pytest.fixture(scope="module")
def cluster(pg_schemas, s3_server, tmp_path_factory):
    """Two instances on one empty schema and one bucket, started at the same moment."""
    bucket = f"shared-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {"DATABASE_URL": pg_schemas.new(), "STORAGE_URL": f"s3://{bucket}/images",
           "SECRET_KEY": secrets.token_urlsafe(32), "WEB_CONCURRENCY": "1", **s3_server.env}
    servers = [None, None]
    errors = []

    def start(i):
        try:
            servers[i] = start_server(tmp_path_factory.mktemp(f"instance{i}"), env)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        yield servers, bucket
    finally:
        for server in servers:
            if server is not None:
                stop_server(server)


@pytest.fixture(scope="module")
def auth(cluster):
    (a, _), _ = cluster
    return a.account("dana")


def objects(s3_server, bucket):
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", ())]


def test_both_instances_are_healthy(cluster):
    servers, _ = cluster
    for server in servers:
        status, _, body = call("GET", server.url + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_upload_on_one_serve_and_delete_on_the_other(cluster, auth, s3_server, qcow2_bytes):
    (a, b), bucket = cluster
    status, _, body = call("POST", a.url + "/images?name=shared", auth, qcow2_bytes)
    assert status == 201, body
    image = json.loads(body)

    status, _, body = call("GET", b.url + "/images", auth)
    assert [i["id"] for i in json.loads(body)] == [image["id"]]

    status, headers, _ = call("GET", f"{b.url}/images/{image['id']}", {**auth, **DISK})
    assert status == 302
    assert headers["Location"].startswith(s3_server.endpoint)
    assert download(headers["Location"]) == qcow2_bytes

    # A link signed by one instance is honoured by the other (one SECRET_KEY).
    status, _, body = call("POST", f"{a.url}/images/{image['id']}/links", auth)
    link = json.loads(body)["url"]
    status, headers, _ = call("GET", link.replace(a.url, b.url))
    assert status == 302
    assert download(headers["Location"]) == qcow2_bytes

    status, _, _ = call("DELETE", f"{b.url}/images/{image['id']}", auth)
    assert status == 204
    status, _, _ = call("GET", f"{a.url}/images/{image['id']}", auth)
    assert status == 404
    assert objects(s3_server, bucket) == []


def test_name_race_across_instances(cluster, auth, s3_server, qcow2_bytes):
    (a, b), bucket = cluster
    results = {}
    gate = threading.Barrier(2)

    def post(server):
        gate.wait(timeout=30)
        results[server.url] = call("POST", server.url + "/images?name=racer", auth, qcow2_bytes)

    threads = [threading.Thread(target=post, args=(s,)) for s in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    answers = sorted((status, json.loads(body)) for status, _, body in results.values())
    assert [status for status, _ in answers] == [201, 400], answers
    assert answers[1][1] == {"name": ["Name already exists"]}
    assert len(objects(s3_server, bucket)) == 1  # the loser's object is gone
    winner = answers[0][1]
    for server in (a, b):
        status, headers, _ = call("GET", f"{server.url}/images/{winner['id']}", {**auth, **DISK})
        assert status == 302
        assert download(headers["Location"]) == qcow2_bytes
