"""`imagestore pull`: into a content-addressed cache, checked against the sha256 before it is
used, resumed with Range after a break, revalidated without moving bytes, downloaded once
for pulls that run at the same time. Bytes are counted where they leave the server: a
LoopbackProxy between the command and a real gunicorn."""

import hashlib
from pathlib import Path

from client_fixtures import MiB
from loopback_proxy import cut_once_after, flip_byte

PIECE = 1 * MiB  # what the client reads at a time: a break loses at most this much


def files(exchanges):
    """The exchanges that carried the image file (200 or 206), in order."""
    return [exchange for exchange in exchanges if exchange.is_file]


def file_requests(exchanges):
    """The exchanges that asked for the file (GET with a disk Accept), in order."""
    return [exchange for exchange in exchanges
            if exchange.request_headers.get("accept") == "application/x-qemu-disk"]


def test_pull_prints_the_cached_path_of_the_checked_file(imagestore, pulled_image):
    image, data = pulled_image
    done = imagestore("pull", "pulled")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == imagestore.cache / "sha256" / f"{image['sha256']}.qcow2"
    assert path.read_bytes() == data
    assert not path.stat().st_mode & 0o222  # read-only: QEMU gets it with snapshot=on
    assert list((imagestore.cache / "partial").iterdir()) == []


def test_a_second_pull_revalidates_and_moves_no_image_bytes(imagestore, proxy, pulled_image):
    image, _ = pulled_image
    first = imagestore("pull", "pulled")
    count = len(proxy.exchanges)
    second = imagestore("pull", str(image["id"]))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    again = file_requests(proxy.exchanges[count:])
    assert [(e.status, e.received) for e in again] == [(304, 0)]
    assert again[0].request_headers["if-none-match"] == f'"{image["sha256"]}"'


def test_a_pull_cut_at_60_percent_resumes_and_moves_only_the_rest(imagestore, proxy,
                                                                  pulled_image):
    image, data = pulled_image
    size = len(data)
    proxy.on_response_body = cut_once_after(size * 6 // 10)
    done = imagestore("pull", "pulled")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == data
    cut, rest = files(proxy.exchanges)
    assert cut.cut and (cut.status, cut.received) == (200, size * 6 // 10)
    assert rest.status == 206
    assert rest.request_headers["if-range"] == f'"{image["sha256"]}"'
    assert rest.received <= size * 4 // 10 + PIECE
    assert "resumed 1 time" in done.stderr


def test_a_broken_pull_is_resumed_by_the_next_run(imagestore, proxy, pulled_image):
    _, data = pulled_image
    size = len(data)
    proxy.on_response_body = cut_once_after(size * 6 // 10)
    broken = imagestore("pull", "pulled", "--retries", "0")
    assert broken.returncode == 3, broken.stderr
    assert broken.stderr.startswith("imagestore: http://127.0.0.1:")
    partial, = (imagestore.cache / "partial").iterdir()
    have = partial.stat().st_size
    assert size * 6 // 10 - PIECE <= have <= size * 6 // 10
    done = imagestore("pull", "pulled")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == data
    resumed = files(proxy.exchanges)[-1]
    assert resumed.status == 206
    assert resumed.request_headers["range"] == f"bytes={have}-"
    assert resumed.received == size - have


def test_a_corrupt_download_is_refused_and_not_cached(imagestore, proxy, pulled_image):
    image, data = pulled_image
    proxy.on_response_body = flip_byte(len(data) // 2)
    refused = imagestore("pull", "pulled")
    assert refused.returncode == 5
    assert "does not match its sha256" in refused.stderr
    assert refused.stdout == ""
    assert not (imagestore.cache / "sha256").exists()
    assert list((imagestore.cache / "partial").iterdir()) == []
    proxy.on_response_body = None
    done = imagestore("pull", "pulled")
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(Path(done.stdout.strip()).read_bytes()).hexdigest() == image["sha256"]


def test_pulls_at_the_same_time_download_once(imagestore, proxy, pulled_image):
    """Three pulls of one image (three VMs starting on one worker): the first downloads,
    held by the proxy until all three have looked the image up; the others wait for its
    lock and then only revalidate."""
    _, data = pulled_image

    def lookups(exchanges):
        return sum(e.path.startswith("/images?") and e.done for e in exchanges)

    def hold_first_file(exchange, block, position):
        if exchange.is_file and exchange is files(proxy.exchanges)[0] and position == 0:
            proxy.wait_for(lambda exchanges: lookups(exchanges) >= 3)
        return block

    proxy.on_response_body = hold_first_file
    pulls = [imagestore.start("pull", "pulled") for _ in range(3)]
    results = [(*pull.communicate(timeout=300), pull.returncode) for pull in pulls]
    results = [(code, out, err) for out, err, code in results]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert len({out for _, out, _ in results}) == 1
    assert Path(results[0][1].strip()).read_bytes() == data
    assert sum("waiting for another pull" in err for _, _, err in results) == 2
    assert [e.received for e in files(proxy.exchanges)] == [len(data)]
    assert sorted(e.status for e in file_requests(proxy.exchanges)) == [200, 304, 304]
