"""Uploads over a real gunicorn that go wrong on the wire: too big, cut off by the client, or
cut off by a killed worker or service. Each leaves nothing behind: no staged file, no stored
file, no row, and nothing for the sweep to find."""

import contextlib
import http.client
import json
import os
import signal
import socket
import time

import pytest
import sample_images
from conftest import files_under, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One worker, so its pid is the one that receives every upload; a 1 MiB size limit."""
    instance = tmp_path_factory.mktemp("hostile")
    server = start_server(instance, {"WEB_CONCURRENCY": "1", "MAX_IMAGE_SIZE": "1M"})
    server.headers = server.account("mallory")
    yield server
    stop_server(server)


def incoming(server):
    return sorted(os.listdir(server.instance / "images" / ".incoming"))


def stored(server):
    return sorted(p.name for p in (server.instance / "images").glob("*.qcow2"))


def wait_for(condition, seconds=15):
    """Poll until condition() is true; return its last value."""
    deadline = time.monotonic() + seconds
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def open_upload(server, length, name="partial", chunked=False):
    """Start a POST /images by hand and send the headers only."""
    sock = socket.create_connection((server.url.split("//")[1].split(":")[0],
                                     int(server.url.rsplit(":", 1)[1])), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    sock.sendall((f"POST /images?name={name} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {server.headers['Authorization']}\r\n{framing}\r\n\r\n")
                 .encode())
    return sock


def read_response(sock):
    """Status and JSON body of the answer on sock."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def send_ignoring_hangup(sock, data):
    """Send what the server may stop reading (docs/platform.md: it answers 413 early and closes)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def test_content_length_over_limit_is_413_at_once(server):
    sock = open_upload(server, 2 * 1024 * 1024)
    send_ignoring_hangup(sock, b"\0" * 65536)
    status, body = read_response(sock)
    sock.close()
    assert status == 413
    assert body == {"message": "Image larger than the limit of 1048576 bytes"}
    assert incoming(server) == [] and stored(server) == []


def test_chunked_body_over_limit_is_cut_off_with_413(server):
    sock = open_upload(server, None, chunked=True)
    # A good header first: one that is refused is answered 400 as soon as it is in.
    start = sample_images.good_v3(server.instance, "big.qcow2").read_bytes()[:65536]
    for n in range(17):  # 1 MiB + 64 KiB
        piece = start if n == 0 else b"\0" * 65536
        send_ignoring_hangup(sock, b"%x\r\n%s\r\n" % (len(piece), piece))
    send_ignoring_hangup(sock, b"0\r\n\r\n")
    status, body = read_response(sock)
    sock.close()
    assert status == 413 and "limit" in body["message"]
    assert wait_for(lambda: incoming(server) == []) and stored(server) == []


def test_client_hanging_up_half_way_leaves_nothing(server):
    data = sample_images.good_v3(server.instance, "half.qcow2").read_bytes()
    sock = open_upload(server, len(data))
    sock.sendall(data[: len(data) // 2])
    assert wait_for(lambda: incoming(server) != [])  # the upload really began
    sock.close()
    assert wait_for(lambda: incoming(server) == [])
    assert stored(server) == []
    # Nothing else to find: no staged file of a dead process, no stored file without a row.
    swept = server.flask("sweep", "--min-age", "0")
    assert swept == "removed 0 temporary files and 0 orphan files"
    assert files_under(server.instance / "images") == []


def start_killable_upload(tmp_path, name):
    """A one-worker server with an upload half sent; returns (server, socket, worker pid)."""
    server = start_server(tmp_path / name, {"WEB_CONCURRENCY": "1"})
    server.headers = server.account("mallory")
    data = sample_images.good_v3(tmp_path, f"{name}.qcow2").read_bytes()
    sock = open_upload(server, len(data), name=name)
    sock.sendall(data[: len(data) // 2])
    assert wait_for(lambda: incoming(server) != [])
    [worker] = server.worker_pids()
    assert incoming(server)[0].startswith(f"{worker}-")
    return server, sock, worker


def listed(server):
    connection = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
    connection.request("GET", "/images", headers=server.headers)
    return json.loads(connection.getresponse().read())


def test_worker_killed_mid_upload_is_swept_by_its_replacement(tmp_path):
    server, sock, worker = start_killable_upload(tmp_path, "worker")
    try:
        os.kill(worker, signal.SIGKILL)
        sock.close()
        # gunicorn starts a new worker, whose start sweeps the dead one's temporary file.
        assert wait_for(lambda: incoming(server) == [] and server.worker_pids() != [])
        assert stored(server) == [] and listed(server) == []
    finally:
        stop_server(server)


def test_service_killed_mid_upload_is_swept_on_restart(tmp_path):
    server, sock, worker = start_killable_upload(tmp_path, "service")
    left = incoming(server)
    os.kill(server.process.pid, signal.SIGKILL)  # the master first, so nobody replaces the worker
    os.kill(worker, signal.SIGKILL)
    server.process.wait()
    sock.close()
    assert incoming(server) == left
    restarted = start_server(server.instance, {"WEB_CONCURRENCY": "1"})
    restarted.headers = server.headers
    try:
        assert incoming(restarted) == []
        assert stored(restarted) == [] and listed(restarted) == []
    finally:
        stop_server(restarted)
