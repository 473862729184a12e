"""Resumable uploads through a real gunicorn (two workers, the Procfile's): a real tus client
(tuspy) sending a real qcow2 and resuming after an interruption, workers killed with kill -9
between two pieces and in the middle of one, and a hostile header answered before the rest
of its piece is sent."""

import base64
import hashlib
import io
import json
import os
import signal
import socket
import urllib.request

import pytest
import sample_images
from conftest import server_with_account
from test_e2e_uploads import wait_for
from tusclient import client as tus_client
from tusclient.storage.filestorage import FileStorage

pytestmark = pytest.mark.slow
MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_with_account(tmp_path_factory.mktemp("tus"), "alice") as server:
        yield server


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A qcow2 image of about 6 MiB with data, and its sha256."""
    path = sample_images.good_v3(tmp_path_factory.mktemp("tusimg"), "six.qcow2", size="64M")
    sample_images.write_data(path, (0, 3 * MIB))
    sample_images.write_data(path, (3 * MIB, 3 * MIB), pattern=0x77)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def get_json(server, path):
    request = urllib.request.Request(server.url + path, headers=server.headers)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def request_head(server, method, path, headers=None, length=0):
    """The bytes of a tus request's head, with the account's token."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
             "Tus-Resumable: 1.0.0", f"Authorization: {server.headers['Authorization']}",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def tus_request(server, method, path, headers=None, body=b""):
    """(status, head, body) of one request on a connection of its own."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request_head(server, method, path, headers, len(body)) + body)
        return answer(sock, method)


def answer(sock, method="PATCH"):
    """(status, head, body) of an answer; tus' 204 and HEAD answers have no body (and 204
    no Content-Length), so only others are read with conftest's read_answer."""
    data = b""
    while b"\r\n\r\n" not in data and (piece := sock.recv(65536)):
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if method == "HEAD" or status == 204:
        return status, head, b""
    length = int(header(head, "Content-Length"))
    while len(rest) < length and (piece := sock.recv(65536)):
        rest += piece
    return status, head, rest[:length]


def header(head, name):
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode().partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def new_upload(server, length, name):
    metadata = "name " + base64.b64encode(name.encode()).decode()
    status, head, _ = tus_request(server, "POST", "/uploads", {
        "Upload-Length": str(length), "Upload-Metadata": metadata})
    assert status == 201
    return header(head, "Location").removeprefix(server.url)


def piece_headers(offset):
    return {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}


def kill_workers(server):
    """kill -9 every worker; wait until gunicorn has started as many new ones."""
    before = server.worker_pids()
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(now := server.worker_pids()) == len(before)
                    and not set(now) & set(before), seconds=60)


class FailsAfter(io.FileIO):
    """The file, read as tuspy reads it, failing once past `stop` bytes: the client dying
    mid-upload (its disk, its laptop lid) after the pieces before went in. tuspy closes
    the stream it fingerprints (a `with` block): this one stays open until close()."""

    def __init__(self, path, stop):
        super().__init__(path, "rb")
        self._stop = stop

    def __exit__(self, *exc):
        return False

    def read(self, size=-1):
        if self.tell() >= self._stop:
            raise OSError("the client went away")
        return super().read(size)


def test_tuspy_uploads_a_real_qcow2_and_resumes_after_an_interruption(server, image, tmp_path):
    path, sha256 = image
    urls = FileStorage(str(tmp_path / "tus-urls.json"))  # where tuspy keeps its upload's URL
    client = tus_client.TusClient(f"{server.url}/uploads", headers=server.headers)
    options = {"chunk_size": MIB, "metadata": {"name": "tuspy", "sha256": sha256},
               "store_url": True, "url_storage": urls, "upload_checksum": True}

    broken = FailsAfter(path, 2 * MIB)
    first = client.uploader(file_stream=broken, **options)
    with broken, pytest.raises(OSError, match="the client went away"):
        first.upload()
    broken.close()

    again = client.uploader(file_path=str(path), **options)  # a new run of the client
    assert (again.url, again.offset) == (first.url, 2 * MIB)  # found, and asked where it stands
    again.upload()
    location = again.request.response_headers["image-location"]
    stored = get_json(server, location.removeprefix(server.url))
    assert (stored["name"], stored["sha256"]) == ("tuspy", sha256)


def test_a_worker_killed_between_pieces_or_in_one_loses_nothing_kept(server, image):
    """kill -9 of every worker after a piece: the next piece, to whichever new worker takes
    it, goes on from the recorded offset. kill -9 in the middle of a piece: its half-written
    bytes are cut back and the piece is sent again."""
    path, sha256 = image
    data = path.read_bytes()
    upload = new_upload(server, len(data), "killed")
    status, head, _ = tus_request(server, "PATCH", upload, piece_headers(0), data[:2 * MIB])
    assert (status, header(head, "Upload-Offset")) == (204, str(2 * MIB))
    kill_workers(server)
    kill_mid_piece(server, upload, data, 2 * MIB)
    status, head, _ = tus_request(server, "PATCH", upload, piece_headers(2 * MIB), data[2 * MIB:])
    assert status == 204
    stored = get_json(server, header(head, "Image-Location").removeprefix(server.url))
    assert stored["sha256"] == sha256


def kill_mid_piece(server, upload, data, offset):
    """Half of the piece at offset, then every worker dies while it is being written; the
    upload is where it was."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(request_head(server, "PATCH", upload, piece_headers(offset), 2 * MIB)
                 + data[offset:offset + MIB + 500_000])
    part = server.instance / "images" / ".uploads" / f"{upload.rsplit('/', 1)[1]}.part"
    assert wait_for(lambda: part.stat().st_size > offset)  # some of it is on disk
    kill_workers(server)
    sock.close()
    status, head, _ = tus_request(server, "HEAD", upload)
    assert (status, header(head, "Upload-Offset")) == (200, str(offset))


def test_on_postgresql_the_lock_of_a_killed_worker_dies_with_it(pg_schemas, image, tmp_path):
    """The upload's lock is a session advisory lock there: the killed worker's connection
    ends, and with it the lock, so the piece sent again is taken, not refused."""
    data = image[0].read_bytes()
    with server_with_account(tmp_path, "alice", {"DATABASE_URL": pg_schemas.new()}) as server:
        upload = new_upload(server, len(data), "pg")
        kill_mid_piece(server, upload, data, 0)
        status, _, body = tus_request(server, "PATCH", upload, piece_headers(0), data)
        assert status == 204, body


def test_a_hostile_header_is_refused_before_the_rest_of_the_piece_is_sent(server, tmp_path):
    data = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    data += bytes(8 * MIB - len(data))
    upload = new_upload(server, len(data), "hostile")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    with sock:
        sock.sendall(request_head(server, "PATCH", upload, piece_headers(0), len(data))
                     + data[:100_000])
        status, _, body = answer(sock)  # answered with 8 MiB still unsent
    assert status == 400 and "backing file" in json.loads(body)["file"][0]
    assert tus_request(server, "HEAD", upload)[0] == 404
