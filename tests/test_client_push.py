"""`imagestore push`: a tus 1.0 upload in pieces, each with its checksum, the file's sha256
in the metadata, through breaks in the connection (a LoopbackProxy cuts it) and across runs
(the upload's URL kept in the state folder); against a real gunicorn."""

import base64
import hashlib
from pathlib import Path

import requests
from client_fixtures import MiB, make_disk
from loopback_proxy import cut_every, cut_once_after

PIECE = 4 * MiB


def patches(exchanges):
    return [exchange for exchange in exchanges if exchange.method == "PATCH"]


def creations(exchanges):
    return [e for e in exchanges if e.method == "POST" and e.path == "/uploads"]


def stored(client_server, url):
    """The image object behind a URL that push printed (through the proxy)."""
    path = url[url.index("/images/"):]
    return requests.get(client_server.url + path, headers=client_server.headers,
                        timeout=30).json()


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uploads_state(imagestore):
    """The push records kept between runs."""
    folder = imagestore.home / ".local" / "state" / "imagestore" / "uploads"
    return sorted(path.name for path in folder.glob("*.json")) if folder.exists() else []


def test_push_sends_pieces_with_checksums_and_prints_the_image_url(imagestore, proxy,
                                                                   client_server, tmp_path):
    disk = make_disk(tmp_path, 10)
    done = imagestore("push", disk, "pushed", "--piece-size", "4M")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url.startswith(f"{proxy.url}/images/")
    assert stored(client_server, url)["sha256"] == sha256_of(disk)
    created, = creations(proxy.exchanges)
    metadata = dict(pair.split(" ") for pair in created.request_headers["upload-metadata"]
                    .split(","))
    assert base64.b64decode(metadata["sha256"]).decode() == sha256_of(disk)
    assert created.request_headers["upload-length"] == str(disk.stat().st_size)
    sent = patches(proxy.exchanges)
    assert [e.sent for e in sent[:-1]] == [PIECE] * (len(sent) - 1)
    assert sum(e.sent for e in sent) == disk.stat().st_size
    first = disk.read_bytes()[:PIECE]
    assert sent[0].request_headers["upload-checksum"] == (
        "sha256 " + base64.b64encode(hashlib.sha256(first).digest()).decode())
    assert uploads_state(imagestore) == []


def test_a_push_through_a_link_cut_every_10_mib_sends_at_most_a_piece_again_per_cut(
        imagestore, proxy, client_server, tmp_path):
    disk = make_disk(tmp_path, 24)
    size = disk.stat().st_size
    proxy.on_request_body = cut_every(10 * MiB)
    done = imagestore("push", disk, "through-cuts", "--piece-size", "4M")
    assert done.returncode == 0, done.stderr
    assert stored(client_server, done.stdout.strip())["sha256"] == sha256_of(disk)
    cuts = sum(e.cut for e in proxy.exchanges)
    assert cuts >= 2  # the pieces sent again may bring a third
    sent = [(e.request_headers["upload-offset"], e.sent, e.status, e.cut)
            for e in patches(proxy.exchanges)]
    assert sum(e.sent for e in patches(proxy.exchanges)) <= size + cuts * PIECE, sent
    assert len(creations(proxy.exchanges)) == 1
    assert "resumed" in done.stderr


def test_a_broken_push_is_resumed_by_the_next_run(imagestore, proxy, client_server, tmp_path):
    disk = make_disk(tmp_path, 16)
    size = disk.stat().st_size
    proxy.on_request_body = cut_once_after(MiB, lambda e: e.method == "PATCH" and
                                      e.request_headers["upload-offset"] == str(2 * PIECE))
    broken = imagestore("push", disk, "resumed", "--piece-size", "4M", "--retries", "0")
    assert broken.returncode == 3, broken.stderr
    assert len(uploads_state(imagestore)) == 1
    count = len(proxy.exchanges)
    done = imagestore("push", disk, "resumed", "--piece-size", "4M")
    assert done.returncode == 0, done.stderr
    assert stored(client_server, done.stdout.strip())["sha256"] == sha256_of(disk)
    asked, *_ = proxy.exchanges[count:]
    assert (asked.method, asked.response_headers["upload-offset"]) == ("HEAD", str(2 * PIECE))
    assert sum(e.sent for e in patches(proxy.exchanges[count:])) == size - 2 * PIECE
    assert len(creations(proxy.exchanges)) == 1
    assert uploads_state(imagestore) == []


def test_after_a_break_no_piece_is_sent_into_a_409(imagestore, proxy, client_server,
                                                    tmp_path):
    """The cut reaches the client at once and the server later, as when a link drops: until
    then the broken request holds the upload, and the server answers 409. The client asks
    with an empty PATCH first, so no byte of a piece goes into that 409."""
    disk = make_disk(tmp_path, 12)

    def conflict_seen():
        proxy.wait_for(lambda exchanges: any(e.status == 409 for e in exchanges))

    proxy.on_request_body = cut_once_after(
        MiB, lambda e: e.method == "PATCH" and e.request_headers["upload-offset"] == str(PIECE),
        linger=conflict_seen)
    done = imagestore("push", disk, "after-409", "--piece-size", "4M")
    assert done.returncode == 0, done.stderr
    assert stored(client_server, done.stdout.strip())["sha256"] == sha256_of(disk)
    refused = [e for e in patches(proxy.exchanges) if e.status == 409]
    assert refused and all(e.request_headers["content-length"] == "0" for e in refused)
    assert sum(e.sent for e in patches(proxy.exchanges)) == disk.stat().st_size + MiB


def test_a_taken_name_is_refused_before_the_file_is_read(imagestore, proxy, tmp_path,
                                                         pulled_image):
    refused = imagestore("push", make_disk(tmp_path, 1), "pulled")
    assert refused.returncode == 1
    assert refused.stderr.startswith("imagestore: an image named pulled exists outside "
                                     "namespaces (id ")
    assert creations(proxy.exchanges) == []


def test_a_file_the_server_refuses_is_reported_with_its_reason(imagestore, tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(MiB))
    refused = imagestore("push", junk, "junk")
    assert refused.returncode == 1
    assert refused.stderr.startswith("imagestore: 400 Bad Request: file: File not a valid "
                                     "QCOW2 image")
    assert uploads_state(imagestore) == []


def test_pushed_into_a_namespace_and_pulled_back(imagestore, tmp_path):
    disk = make_disk(tmp_path, 2)
    pushed = imagestore("push", disk, "roundtrip", "--namespace", "ci/linux")
    assert pushed.returncode == 0, pushed.stderr
    pulled = imagestore("pull", "roundtrip", "--namespace", "ci/linux")
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip()).read_bytes() == disk.read_bytes()
