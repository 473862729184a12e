"""Downloads and signed links against the real gunicorn: bytes on the wire, qemu-img reading
a link over HTTP, sendfile, cut-off and slow clients."""

import hashlib
import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import make_qcow2, start_server, stop_server

DISK = "application/x-qemu-disk"
MiB = 1 << 20
BIG_SIZE = "256M"
# A worker thread that stops answering for this long is killed; the slow reader stalls longer.
WORKER_TIMEOUT = 2


def run_qemu(args, check=True, **kwargs):
    """Run qemu-img/qemu-io on a link, bounded in time: a hang fails the test, never blocks it.

    qemu 7.2's curl driver loses a finished request now and then when several are in flight
    and then waits for ever (docs/downloads.md): every copy here runs with the `-m 1` of the
    links answer, and test_answer_qemu_img_args_never_hang holds the answer to that.
    """
    return subprocess.run(args, check=check, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gunicorn from the Procfile with one worker (so other requests share the slow client's
    process) and a short worker timeout (so a download that outlived it would be killed)."""
    server = start_server(tmp_path_factory.mktemp("downloads"),
                          {"WEB_CONCURRENCY": "1", "GUNICORN_TIMEOUT": str(WORKER_TIMEOUT)})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def alice(server):
    """Bearer headers of a user made through the CLI."""
    return server.account("alice")


def connect(server, timeout=30):
    """An HTTP connection to the server that sends bodies in 1 MiB pieces."""
    address = urlsplit(server.url)
    return http.client.HTTPConnection(address.hostname, address.port, timeout=timeout,
                                      blocksize=MiB)


def call(server, method, path, headers=None, body=None):
    """One request on a fresh connection; return (response, body bytes)."""
    conn = connect(server)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def upload(server, headers, name, path):
    """POST a file as an image; return the image object."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        response, body = call(server, "POST", f"/images?name={name}",
                              {**headers, "Content-Length": str(size)}, f)
    assert response.status == 201, body
    return json.loads(body)


@pytest.fixture(scope="module")
def data_image(server, alice, tmp_path_factory):
    """An 8 MiB disk with 3 MiB of random data, as qcow2; (image, qcow2 bytes, raw bytes)."""
    folder = tmp_path_factory.mktemp("data")
    raw = os.urandom(3 * MiB) + bytes(5 * MiB)
    (folder / "disk.raw").write_bytes(raw)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                    str(folder / "disk.raw"), str(folder / "disk.qcow2")], check=True)
    image = upload(server, alice, "data", folder / "disk.qcow2")
    return image, (folder / "disk.qcow2").read_bytes(), raw


@pytest.fixture(scope="module")
def random_image(server, alice, tmp_path_factory):
    """A 16 MiB disk of random bytes, as qcow2: qemu-img reads it in eight 2 MiB requests,
    each larger than what libcurl hands QEMU in one go; (image, raw bytes)."""
    folder = tmp_path_factory.mktemp("random")
    raw = os.urandom(16 * MiB)
    (folder / "disk.raw").write_bytes(raw)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                    str(folder / "disk.raw"), str(folder / "disk.qcow2")], check=True)
    return upload(server, alice, "random", folder / "disk.qcow2"), raw


@pytest.fixture(scope="module")
def big_image(server, alice, tmp_path_factory):
    """A 256 MiB qcow2 whose clusters are allocated up front (fallocate: quick, no writes)."""
    path = make_qcow2(tmp_path_factory.mktemp("big") / "big.qcow2", BIG_SIZE,
                      "-o", "preallocation=falloc")
    try:
        image = upload(server, alice, "big", path)
    finally:
        path.unlink()  # the store has its copy; keep disk use to one
    assert image["size"] > 256 * MiB
    yield image
    call(server, "DELETE", f"/images/{image['id']}", alice)


def make_link(server, headers, image):
    """A signed link to image, made over HTTP."""
    return link_answer(server, headers, image)["url"]


def link_answer(server, headers, image):
    """The whole answer of POST /images/:id/links: the URL and the ready QEMU lines."""
    response, body = call(server, "POST", f"/images/{image['id']}/links", headers)
    assert response.status == 201, body
    return json.loads(body)


def workers(server):
    """The pids of gunicorn's workers; there is always one."""
    pids = server.worker_pids()
    assert pids
    return pids


def proc_field(pid, name, file="status"):
    """A number from /proc/<pid>/status (in kB) or /proc/<pid>/io."""
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise KeyError(name)


def open_fds(server):
    """Every open descriptor of every worker, as the path or socket it points to."""
    fds = []
    for pid in workers(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                fds.append(os.readlink(fd))
            except FileNotFoundError:
                continue  # closed while listing
    return fds


def wait_until(condition, deadline=15):
    """Poll condition until it holds or the deadline passes; return its last value."""
    end = time.monotonic() + deadline
    while not (value := condition()) and time.monotonic() < end:
        time.sleep(0.05)
    return value


def raw_get(server, path, headers, method="GET"):
    """Open a socket and send a request; return the socket and the response head as text."""
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address.netloc}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock, head.decode()


def read_exactly(sock, count, digest=None):
    """Read count bytes from sock (into digest, if given); return how many came."""
    got = 0
    buffer = bytearray(MiB)
    while got < count:
        n = sock.recv_into(buffer, min(MiB, count - got))
        if n == 0:
            break
        if digest is not None:
            digest.update(memoryview(buffer)[:n])
        got += n
    return got


def test_full_download_is_byte_exact(server, alice, data_image):
    image, qcow2, _ = data_image
    response, body = call(server, "GET", f"/images/{image['id']}", {**alice, "Accept": DISK})
    assert response.status == 200
    assert body == qcow2
    assert hashlib.sha256(body).hexdigest() == image["sha256"]
    assert response.getheader("Content-Length") == str(len(qcow2))
    assert response.getheader("Content-Type") == DISK
    assert response.getheader("ETag") == f'"{image["sha256"]}"'
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("Content-Disposition") == 'attachment; filename="data.qcow2"'


@pytest.mark.parametrize(("spec", "start", "end"), [("bytes=1000-1999", 1000, 2000),
                                                    ("bytes=-4096", -4096, None),
                                                    ("bytes=65536-", 65536, None)])
def test_range_over_the_wire(server, alice, data_image, spec, start, end):
    image, qcow2, _ = data_image
    response, body = call(server, "GET", f"/images/{image['id']}",
                          {**alice, "Accept": DISK, "Range": spec})
    start, end = start % len(qcow2), end or len(qcow2)
    assert response.status == 206
    assert body == qcow2[start:end]
    assert response.getheader("Content-Range") == f"bytes {start}-{end - 1}/{len(qcow2)}"


def test_range_in_the_middle_of_a_big_file(server, alice, big_image):
    middle = big_image["size"] // 2
    response, body = call(server, "GET", f"/images/{big_image['id']}",
                          {**alice, "Accept": DISK, "Range": f"bytes={middle}-{middle + MiB - 1}"})
    assert response.status == 206
    assert len(body) == MiB
    assert response.getheader("Content-Length") == str(MiB)


def test_unsatisfiable_range_over_the_wire(server, alice, data_image):
    image, qcow2, _ = data_image
    response, body = call(server, "GET", f"/images/{image['id']}",
                          {**alice, "Accept": DISK, "Range": f"bytes={len(qcow2)}-"})
    assert response.status == 416
    assert response.getheader("Content-Range") == f"bytes */{len(qcow2)}"
    assert json.loads(body) == {"message": "Range Not Satisfiable"}


def test_head_sends_the_headers_of_get_and_no_body(server, alice, data_image):
    image, qcow2, _ = data_image
    path, headers = f"/images/{image['id']}", {**alice, "Accept": DISK}
    sock, get_head = raw_get(server, path, headers)
    sock.close()
    sock, head_head = raw_get(server, path, headers, method="HEAD")
    with sock:
        assert sock.recv(65536) == b""  # nothing after the headers

    def fields(head):
        lines = head.rstrip("\r\n").split("\r\n")
        return lines[0], {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])
                          if k.lower() != "date"}

    assert fields(head_head) == fields(get_head)
    assert fields(head_head)[0] == "HTTP/1.1 200 OK"
    assert fields(head_head)[1]["content-length"] == str(len(qcow2))


def test_conditional_get_over_the_wire(server, alice, data_image):
    image, _, _ = data_image
    response, body = call(server, "GET", f"/images/{image['id']}",
                          {**alice, "Accept": DISK, "If-None-Match": f'"{image["sha256"]}"'})
    assert (response.status, body) == (304, b"")
    assert response.getheader("ETag") == f'"{image["sha256"]}"'


def test_link_serves_the_file_without_a_token(server, alice, data_image):
    image, qcow2, _ = data_image
    path = urlsplit(make_link(server, alice, image)).path
    response, body = call(server, "GET", path)
    assert (response.status, body) == (200, qcow2)
    response, body = call(server, "GET", path, {"Range": "bytes=0-3"})
    assert (response.status, body) == (206, b"QFI\xfb")


def test_qemu_img_info_reads_a_link(server, alice, data_image):
    image, _, _ = data_image
    answer = link_answer(server, alice, image)
    for name in (answer["url"], answer["qemu_json"]):
        result = run_qemu(["qemu-img", "info", "--output=json", name], check=True,
                          capture_output=True, text=True)
        info = json.loads(result.stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == 8 * MiB


def test_answer_qemu_img_args_never_hang(server, alice, random_image, tmp_path):
    """qemu-img with the links answer's own arguments, 20 copies in a row, each under a hard
    timeout. Without its `-m 1`, qemu 7.2 hung in some of these runs on a busy machine (two
    CPU-bound processes on two cores), with every keep-alive setting tried and with the 60 s
    timeout alike: a request lost when two finish together (docs/downloads.md)."""
    image, raw = random_image
    args = link_answer(server, alice, image)["qemu_img_args"]
    out = tmp_path / "out.raw"
    for _ in range(20):
        run_qemu(["qemu-img", *args, "-O", "raw", str(out)], check=True, capture_output=True)
        assert out.read_bytes() == raw


def test_answer_qemu_args_open_the_image(server, alice, data_image):
    """The -drive options, checked with qemu-io (qemu-system is not installed here): the image
    opens, reads match the disk, and a write lands in the throw-away overlay."""
    image, _, raw = data_image
    flag, drive = link_answer(server, alice, image)["qemu_args"]
    assert flag == "-drive"
    assert drive.endswith(",if=virtio,snapshot=on")  # -drive only; qemu-io's -s is snapshot=on
    options = drive.removesuffix(",if=virtio,snapshot=on")
    result = run_qemu(["qemu-io", "--image-opts", "-s", options,
                       "-c", "read -P 0 4M 64k", "-c", "write -P 0xab 0 64k",
                       "-c", "read -P 0xab 0 64k"], check=True, capture_output=True, text=True)
    assert "Pattern verification failed" not in result.stdout, result.stdout
    assert result.stdout.count("read 65536/65536 bytes") == 2, result.stdout
    assert raw[4 * MiB:4 * MiB + 65536] == bytes(65536)


def test_local_overlay_backed_by_a_link_reads_through_it(server, alice, data_image, tmp_path):
    """How a QEMU host boots from the store: guest writes stay local, reads go to the link."""
    image, _, raw = data_image
    backing = link_answer(server, alice, image)["qemu_json"]
    overlay, out = tmp_path / "overlay.qcow2", tmp_path / "out.raw"
    run_qemu(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing,
              str(overlay)], check=True)
    run_qemu(["qemu-io", "-f", "qcow2", str(overlay), "-c", "write -P 0xab 0 64k"],
             check=True, capture_output=True)
    run_qemu(["qemu-img", "convert", "-m", "1", "-O", "raw", str(overlay), str(out)],
             check=True)
    assert out.read_bytes() == b"\xab" * 65536 + raw[65536:]


def test_qemu_img_is_refused_a_forged_link(server, alice, data_image):
    image, _, _ = data_image
    url = make_link(server, alice, image)
    prefix, _, name = url.rpartition("/")
    forged = prefix[:-5] + ("AAAAA" if prefix[-5:] != "AAAAA" else "BBBBB") + "/" + name
    result = run_qemu(["qemu-img", "info", forged], check=False, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "403" in result.stderr


def test_download_goes_out_by_sendfile_in_flat_memory(server, alice, big_image):
    """The file never passes through Python: the worker makes a handful of read-type
    syscalls (sendfile counts as one each) for 256 MiB, where reading it in 1 MiB pieces
    would take 256 and more; and its peak memory does not grow with the file."""
    path = f"/images/{big_image['id']}"
    headers = {**alice, "Accept": DISK}
    call(server, "GET", path, {**headers, "Range": "bytes=0-0"})  # warm the code path up
    (pid,) = workers(server)
    syscalls, peak = proc_field(pid, "syscr", "io"), proc_field(pid, "VmHWM")
    sock, head = raw_get(server, path, headers)
    with sock:
        digest = hashlib.sha256()
        assert read_exactly(sock, big_image["size"], digest) == big_image["size"]
    assert head.startswith("HTTP/1.1 200")
    assert digest.hexdigest() == big_image["sha256"]
    read_calls = proc_field(pid, "syscr", "io") - syscalls
    assert read_calls < 64, read_calls
    growth_kib = proc_field(pid, "VmHWM") - peak
    assert growth_kib < 16 * 1024, growth_kib


def test_cut_off_download_leaves_the_server_healthy(server, alice, big_image):
    """Read half, hang up: the worker closes the file, leaks no descriptor, serves on."""
    path = f"/images/{big_image['id']}"
    before = open_fds(server)
    sock, head = raw_get(server, path, {**alice, "Accept": DISK})
    assert head.startswith("HTTP/1.1 200")
    assert read_exactly(sock, big_image["size"] // 2) == big_image["size"] // 2
    assert any(fd.endswith(".qcow2") for fd in open_fds(server))  # the download is under way
    sock.close()

    def settled():
        fds = open_fds(server)
        return len(fds) <= len(before) and not any(fd.endswith(".qcow2") for fd in fds)

    assert wait_until(settled), (before, open_fds(server))
    response, body = call(server, "GET", "/healthz")
    assert (response.status, json.loads(body)) == (200, {"status": "ok"})


def test_slow_reader_blocks_nobody_and_outlives_the_worker_timeout(server, alice, big_image,
                                                                   data_image):
    """One client reads 1 MiB of a big file, then stalls past the worker timeout; the same
    worker answers other requests meanwhile, and the slow client then gets every byte."""
    image, qcow2, _ = data_image
    before = workers(server)
    sock, head = raw_get(server, f"/images/{big_image['id']}", {**alice, "Accept": DISK})
    digest = hashlib.sha256()
    with sock:
        assert head.startswith("HTTP/1.1 200")
        assert read_exactly(sock, MiB, digest) == MiB
        answers = []
        stalled_until = time.monotonic() + 2 * WORKER_TIMEOUT
        while time.monotonic() < stalled_until:
            health, _ = call(server, "GET", "/healthz")
            got, body = call(server, "GET", f"/images/{image['id']}", {**alice, "Accept": DISK})
            answers.append((health.status, got.status, body == qcow2))
            time.sleep(0.25)
        rest = big_image["size"] - MiB
        assert read_exactly(sock, rest, digest) == rest
    assert set(answers) == {(200, 200, True)}
    assert digest.hexdigest() == big_image["sha256"]
    assert workers(server) == before  # the worker was not killed and restarted
