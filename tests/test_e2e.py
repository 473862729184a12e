"""End to end: a real gunicorn started from the Procfile, driven over HTTP like curl does."""

import hashlib
import http.client
import json
import subprocess
from urllib.parse import urlparse

import pytest
from conftest import files_under

pytestmark = pytest.mark.slow


def request(server, method, path, headers=None, body=None):
    """One HTTP request; returns (status, headers, body bytes)."""
    parsed = urlparse(server.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A qcow2 with some data written into it, so the file is not all header."""
    path = tmp_path_factory.mktemp("e2e") / "data.qcow2"
    raw = path.with_suffix(".raw")
    raw.write_bytes(bytes(range(256)) * 8192)  # 2 MiB of non-zero data
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def alice(live_server):
    return live_server.account("alice")


def test_upload_list_download_delete(live_server, alice, image_file):
    data = image_file.read_bytes()
    status, headers, body = request(live_server, "POST", "/images?name=alpine", alice, data)
    assert status == 201, body
    image = json.loads(body)
    assert headers["Location"] == f"{live_server.url}/images/{image['id']}"
    assert image["sha256"] == hashlib.sha256(data).hexdigest()

    status, headers, body = request(live_server, "GET", "/images?search=alp", alice)
    assert status == 200 and [i["id"] for i in json.loads(body)] == [image["id"]]

    status, headers, body = request(live_server, "GET", f"/images/{image['id']}",
                                    {**alice, "Accept": "application/octet-stream"})
    assert status == 200 and body == data
    assert headers["Content-Type"] == "application/octet-stream"

    status, headers, body = request(live_server, "DELETE", f"/images/{image['id']}", alice)
    assert (status, body) == (204, b"")
    status, _, body = request(live_server, "GET", f"/images/{image['id']}", alice)
    assert status == 404 and json.loads(body) == {"message": "Not Found"}


def test_chunked_upload_with_curl(live_server, alice, image_file):
    """curl -T with chunked transfer, as a CI worker would stream an image."""
    result = subprocess.run(
        ["curl", "-sS", "-X", "POST", "-T", str(image_file), "-H", "Transfer-Encoding: chunked",
         "-H", alice["Authorization"].join(["Authorization: ", ""]),
         f"{live_server.url}/images?name=chunky"],
        capture_output=True, text=True, check=True)
    image = json.loads(result.stdout)
    assert image["name"] == "chunky"
    assert image["sha256"] == hashlib.sha256(image_file.read_bytes()).hexdigest()


def test_data_binary_upload_with_curl(live_server, alice, image_file):
    """The README's curl line: --data-binary keeps the bytes as they are."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-X", "POST",
         "-H", "Authorization: " + alice["Authorization"],
         "--data-binary", f"@{image_file}", f"{live_server.url}/images?name=curl-bin"],
        capture_output=True, text=True, check=True)
    body, _, code = result.stdout.rpartition("\n")
    assert code == "201", body
    assert json.loads(body)["size"] == image_file.stat().st_size


def test_refused_upload_over_the_wire_leaves_nothing(live_server, alice):
    """The store and its staging folder hold exactly the files they held before."""
    images_dir = live_server.instance / "images"
    before = files_under(images_dir)
    status, _, body = request(live_server, "POST", "/images?name=junk", alice, b"junk" * 5000)
    assert status == 400 and "file" in json.loads(body)
    assert files_under(images_dir) == before
    assert list((images_dir / ".incoming").iterdir()) == []


def test_errors_are_json_over_the_wire(live_server, alice):
    status, headers, body = request(live_server, "GET", "/nope")
    assert status == 404 and headers["Content-Type"] == "application/json"
    status, headers, body = request(live_server, "GET", "/images")
    assert status == 401 and json.loads(body)["message"]


def test_racing_uploads_of_one_name(live_server, alice, image_file):
    """Two uploads of one name at once: one 201, one 400, and one file stored."""
    from concurrent.futures import ThreadPoolExecutor
    data = image_file.read_bytes()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda _: request(live_server, "POST", "/images?name=race", alice, data), range(2)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201, 400]
    loser = next(body for status, _, body in results if status == 400)
    assert json.loads(loser) == {"name": ["Name already exists"]}
    _, _, body = request(live_server, "GET", "/images?search=race", alice)
    assert len(json.loads(body)) == 1
