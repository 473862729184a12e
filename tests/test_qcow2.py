"""qcow2.py against real images made by qemu-img and qemu-io, good and hostile."""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import pytest
import sample_images
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from image_fixtures import GOOD, HOSTILE, LIMIT, PASSWD

import qcow2

# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def qemu_img_calls(monkeypatch) -> list[tuple[str, ...]]:
    """Record every qemu-img run that inspect_qcow2 makes."""
    calls: list[tuple[str, ...]] = []
    real = qcow2._run_qemu_img

    def recording(*args: str, **options):
        calls.append(args)
        return real(*args, **options)

    monkeypatch.setattr(qcow2, "_run_qemu_img", recording)
    return calls


@pytest.fixture
def listener():
    """A TCP socket listening on 127.0.0.1, to prove that nothing connects to it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def connected(sock: socket.socket) -> bool:
    """Whether anybody has connected to the listener."""
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def fake_qemu_img(monkeypatch, directory: Path, script: str) -> None:
    """Make qcow2 run a shell script in place of qemu-img."""
    path = directory / "fake-qemu-img"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    monkeypatch.setattr(qcow2, "QEMU_IMG", str(path))


def refusal(path: Path, limit: int = LIMIT) -> str:
    """The message inspect_qcow2 refuses path with (failing if it accepts it)."""
    with pytest.raises(qcow2.ImageRefused) as caught:
        qcow2.inspect_qcow2(str(path), limit)
    message = str(caught.value)
    assert message.startswith("File not a valid QCOW2 image: ")
    assert str(path.parent) not in message and "/tmp" not in message
    assert not any(line in message for line in PASSWD.read_text().splitlines() if line)
    return message


# --- hostile images ----------------------------------------------------------------------

@pytest.mark.parametrize("maker, expected, qemu, limit", HOSTILE)
def test_hostile_image_is_refused(case_image, qemu_img_calls, maker, expected, qemu, limit):
    """Each hostile upload gets its own rule's message; qemu-img never sees the worst."""
    path = case_image(maker)
    message = refusal(path, limit)
    assert expected in message
    assert bool(qemu_img_calls) == qemu


def test_messages_never_show_passwd(tmp_path, qemu_img_calls):
    """No refusal of an image naming /etc/passwd echoes the name or the content."""
    passwd = PASSWD.read_text()
    makers = [sample_images.vmdk_flat_descriptor,
              lambda d: sample_images.with_backing(d, str(PASSWD)),
              lambda d: sample_images.with_extension(
                  sample_images.data_file(d), sample_images.EXT_DATA_FILE, str(PASSWD).encode())]
    for number, maker in enumerate(makers):
        directory = tmp_path / str(number)
        directory.mkdir()
        message = refusal(maker(directory))
        assert "passwd" not in message
        assert not any(line and line in message for line in passwd.splitlines())
    assert qemu_img_calls == []


# --- good images -------------------------------------------------------------------------

@pytest.mark.parametrize("maker, version, virtual_size, cluster_size", GOOD)
def test_good_image_is_accepted(tmp_path, qemu_img_calls, maker, version, virtual_size,
                                cluster_size):
    """Healthy self-contained images pass, after qemu-img info and check both ran."""
    info = qcow2.inspect_qcow2(str(maker(tmp_path)), LIMIT)
    assert info == qcow2.ImageInfo(virtual_size, version, cluster_size)
    assert [call[0] for call in qemu_img_calls] == ["info", "check"]


def test_leaked_cluster_image_really_has_leaks(tmp_path):
    """The leaked-cluster image exercises check's exit status 3, which is accepted."""
    path = sample_images.leaked(tmp_path)
    spec = qcow2._image_spec(str(path))
    assert qcow2._run_qemu_img("check", "-f", "qcow2", "--output=json", spec).returncode == 3


def test_relative_path_is_accepted(tmp_path, monkeypatch):
    """A relative path is made absolute before it goes into qemu-img's options."""
    sample_images.good_v3(tmp_path, "rel,with=odd:chars.qcow2")
    monkeypatch.chdir(tmp_path)
    assert qcow2.inspect_qcow2("rel,with=odd:chars.qcow2", LIMIT).virtual_size == 1 << 20


class ReadRecorder:
    """A stand-in for open() that records the size of every read."""

    def __init__(self, sizes: list[int], *args):
        self.sizes, self.args = sizes, args

    def __enter__(self):
        self.file = open(*self.args)  # closed in __exit__
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def fileno(self) -> int:
        return self.file.fileno()

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return self.file.read(size)


def test_only_the_start_of_the_file_is_read(tmp_path, monkeypatch):
    """inspect_qcow2 reads one bounded piece of the upload in Python, never all of it."""
    sizes: list[int] = []
    monkeypatch.setattr(qcow2, "open", lambda *args: ReadRecorder(sizes, *args), raising=False)
    qcow2.inspect_qcow2(str(sample_images.with_data(tmp_path)), LIMIT)
    assert sizes == [qcow2.HEADER_READ_SIZE]


# --- qemu-img, second line of defence ----------------------------------------------------

def test_http_backing_file_is_never_contacted(tmp_path, listener):
    """Neither the header check nor qemu-img (run anyway) connects to a backing URL."""
    port = listener.getsockname()[1]
    path = sample_images.with_backing(tmp_path, f"http://127.0.0.1:{port}/disk.raw")
    assert "has a backing file" in refusal(path)
    for command in ("info", "check"):
        qcow2._run_qemu_img(command, "-f", "qcow2", "--output=json", qcow2._image_spec(str(path)))
    assert not connected(listener)


def permissive_header(data: bytes, file_size: int, max_virtual_size: int) -> qcow2.Qcow2Header:
    """A stand-in for read_qcow2_header that misses everything: a header check with a bug."""
    return qcow2.Qcow2Header(3, 0, 0, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0)


@pytest.mark.parametrize("maker, expected", [
    (lambda d, port: sample_images.with_backing(d, f"http://127.0.0.1:{port}/x"),
     "has a backing file"),
    (lambda d, port: sample_images.with_backing(d, f"nbd://127.0.0.1:{port}"),
     "has a backing file"),
    (lambda d, port: sample_images.with_extension(
        sample_images.data_file(d), sample_images.EXT_DATA_FILE,
        f'json:{{"driver":"nbd","host":"127.0.0.1","port":"{port}"}}'.encode()),
     "external data file"),
    (lambda d, port: sample_images.data_file(d), "external data file"),
    (lambda d, port: sample_images.set_incompatible(sample_images.good_v3(d), 1 << 0),
     "not closed cleanly"),
    (lambda d, port: sample_images.set_incompatible(sample_images.good_v3(d), 1 << 1),
     "marked corrupt"),
    (lambda d, port: sample_images.good_v3(d, size="2M"), "qemu-img info disagrees"),
], ids=["http-backing", "nbd-backing", "nbd-data-file", "data-file", "dirty", "corrupt", "size"])
def test_qemu_img_catches_what_a_broken_header_check_misses(tmp_path, monkeypatch, listener,
                                                             maker, expected):
    """With the header check disabled, qemu-img info still refuses, opening nothing else."""
    path = maker(tmp_path, listener.getsockname()[1])
    monkeypatch.setattr(qcow2, "read_qcow2_header", permissive_header)
    assert expected in refusal(path)
    assert not connected(listener)


def test_info_reports_data_file_without_opening_it(tmp_path):
    """qemu-img info names an external data file even when that file is gone."""
    path = sample_images.data_file(tmp_path)
    (tmp_path / "external.raw").unlink()
    done = qcow2._run_qemu_img("info", "-f", "qcow2", "--output=json", qcow2._image_spec(str(path)))
    assert done.returncode == 0
    with pytest.raises(qcow2.ImageRefused, match="external data file"):
        qcow2._check_info(qcow2._json_report(done), permissive_header(b"", 0, 0))


def test_qemu_img_runs_with_limits_and_a_clean_environment(tmp_path, monkeypatch):
    """CPU and memory are capped and proxy settings do not reach qemu-img."""
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    fake_qemu_img(monkeypatch, tmp_path, "ulimit -t; ulimit -v; ulimit -c; ulimit -f; env")
    out = qcow2._run_qemu_img("info").stdout.decode()
    cpu = str(qcow2.CPU_BASE_SECONDS)
    assert out.split()[:4] == [cpu, str(1 << 20), "0", str(qcow2.OUTPUT_BYTES // 512)]
    assert "LC_ALL=C" in out and "proxy" not in out.lower()


def test_qemu_img_output_is_bounded(tmp_path, monkeypatch):
    """Endless stdout is cut off by RLIMIT_FSIZE; endless stderr is never read at all."""
    fake_qemu_img(monkeypatch, tmp_path,
                  "head -c 100000000 /dev/zero >&2; exec head -c 5000000 /dev/zero")
    assert "output allowance" in refusal(sample_images.good_v3(tmp_path))


def test_qemu_img_that_hangs_is_killed(tmp_path, monkeypatch):
    """A qemu-img that never finishes is killed at the timeout and the upload refused."""
    fake_qemu_img(monkeypatch, tmp_path, "exec sleep 30")
    monkeypatch.setattr(qcow2, "TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(qcow2, "WALL_PER_CPU_SECOND", 0.1)
    assert "qemu-img took longer than 0.5 s" in refusal(sample_images.good_v3(tmp_path))


@pytest.mark.slow  # a second of CPU, by design
def test_qemu_img_that_spins_hits_the_cpu_limit(tmp_path, monkeypatch):
    """A qemu-img that burns CPU is stopped by RLIMIT_CPU and the upload refused."""
    fake_qemu_img(monkeypatch, tmp_path, "while :; do :; done")
    monkeypatch.setattr(qcow2, "CPU_BASE_SECONDS", 1)
    assert "needs more CPU time than the 1 s allowed" in refusal(sample_images.good_v3(tmp_path))


def test_qemu_img_failing_to_open_is_refused(tmp_path, monkeypatch):
    """An info that fails is a refusal whose message hides qemu-img's own words and paths."""
    fake_qemu_img(monkeypatch, tmp_path, "echo \"qemu-img: Could not open '$*'\" >&2; exit 1")
    message = refusal(sample_images.good_v3(tmp_path))
    assert "qemu-img cannot open it" in message and "Could not open" not in message


def test_check_that_cannot_finish_is_refused(tmp_path, monkeypatch):
    """A check exit status other than 0, 2 or 3 is a refusal."""
    info = '{"format": "qcow2", "virtual-size": 1048576, "cluster-size": 65536, ' \
           '"format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}'
    fake_qemu_img(monkeypatch, tmp_path, f"[ \"$1\" = info ] && echo '{info}' && exit 0; exit 1")
    assert "qemu-img check could not finish" in refusal(sample_images.good_v3(tmp_path))


# --- qemu-img version --------------------------------------------------------------------

def test_installed_qemu_img_is_recent_enough():
    """The qemu-img here meets MIN_QEMU_IMG_VERSION."""
    assert qcow2.qemu_img_version() >= qcow2.MIN_QEMU_IMG_VERSION
    qcow2.require_qemu_img()


def test_missing_qemu_img_is_a_clear_error(monkeypatch):
    """No qemu-img on PATH: RuntimeError telling what to install."""
    monkeypatch.setattr(qcow2, "QEMU_IMG", "/nonexistent/qemu-img")
    with pytest.raises(RuntimeError, match="install qemu-utils"):
        qcow2.require_qemu_img()


@pytest.mark.parametrize("output, expected", [
    ("qemu-img version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6)", "6.2.0 is too old"),
    ("qemu-img version 7.1.0", "7.1.0 is too old"),
    ("something else", "cannot tell the version"),
])
def test_old_or_strange_qemu_img_is_a_clear_error(tmp_path, monkeypatch, output, expected):
    """An old or unrecognised qemu-img: RuntimeError naming the problem."""
    fake_qemu_img(monkeypatch, tmp_path, f"echo '{output}'")
    with pytest.raises(RuntimeError, match=expected):
        qcow2.require_qemu_img()


def test_version_with_two_parts(tmp_path, monkeypatch):
    """A version without a micro part reads as .0."""
    fake_qemu_img(monkeypatch, tmp_path, "echo 'qemu-img version 9.1'")
    assert qcow2.qemu_img_version() == (9, 1, 0)


# --- read_qcow2_header on arbitrary bytes ------------------------------------------------

@pytest.fixture(scope="session")
def good_headers(tmp_path_factory) -> list[bytes]:
    """The first 64 KiB of a few varied good images."""
    directory = tmp_path_factory.mktemp("headers")
    makers = [sample_images.good_v2, sample_images.good_v3, sample_images.zstd,
              sample_images.snapshot_and_bitmap, sample_images.extended_l2]
    return [maker(directory).read_bytes()[:qcow2.HEADER_READ_SIZE] for maker in makers]


# The real images of the hypothesis tests below: how many of their first bytes are mutated.
REAL_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def real_headers(tmp_path_factory) -> list[tuple[bytes, int]]:
    """The first bytes and sizes of real images: QCOW2 v3 and v2 (compat=0.10), plain,
    with another cluster size, with extended L2, with zstd, and last one with a backing file."""
    folder = tmp_path_factory.mktemp("real-headers")
    variants = [(), ("-o", "compat=0.10"), ("-o", "cluster_size=4096"),
                ("-o", "extended_l2=on,cluster_size=65536"), ("-o", "compression_type=zstd"),
                ("-b", str(folder / "v0.qcow2"), "-F", "qcow2")]
    found = []
    for n, options in enumerate(variants):
        data = sample_images.create(folder, f"v{n}.qcow2", *options, size="16M").read_bytes()
        found.append((data[:REAL_HEADER_BYTES], len(data)))
    return found


def vet(data: bytes, file_size: int, limit: int = LIMIT) -> qcow2.Qcow2Header | None:
    """read_qcow2_header either refuses with ImageRefused (None) or returns a header that is
    safe (returned)."""
    try:
        parsed = qcow2.read_qcow2_header(data, file_size, limit)
    except qcow2.ImageRefused as exc:
        assert str(exc).startswith(qcow2.PREFIX)
        return None
    assert parsed.version in (2, 3) and 9 <= parsed.cluster_bits <= 21
    assert parsed.virtual_size <= limit
    assert parsed.incompatible_features & 0b111 == 0  # not dirty, corrupt, or external data
    forbidden = {sample_images.EXT_DATA_FILE, sample_images.EXT_CRYPTO,
                 sample_images.EXT_BACKING_FORMAT}
    assert not forbidden & set(parsed.extensions)
    assert struct.unpack_from(">QI", data, 8) == (0, 0)  # no backing file
    assert struct.unpack_from(">I", data, 32) == (0,)  # not encrypted
    return parsed


def test_random_bytes_only_raise_image_refused():
    """Random data, with and without the magic, of every short length."""
    rng = random.Random(1234)
    for length in [*range(130), 512, 4096, 65536]:
        for prefix in (b"", b"QFI\xfb"):
            data = prefix + rng.randbytes(length)
            vet(data, rng.choice([0, len(data), 1 << 20, 1 << 62]))


@pytest.mark.slow  # a second of CPU
def test_mutated_headers_only_raise_image_refused(good_headers):
    """Good headers with random bytes, boundary field values and truncations."""
    rng = random.Random(5678)
    boundaries = [0, 1, 7, 8, 72, 104, 112, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
    for _ in range(20000):
        data = bytearray(rng.choice(good_headers))
        for _ in range(rng.randint(1, 4)):
            offset = rng.randrange(0, 512)
            if rng.random() < 0.5:
                data[offset] = rng.randrange(256)
            else:
                width = rng.choice([4, 8])
                value = rng.choice(boundaries) % (1 << 8 * width)
                data[offset:offset + width] = value.to_bytes(width, "big")
        if rng.random() < 0.2:
            del data[rng.randrange(0, 600):]
        vet(bytes(data), rng.choice([len(data), 1 << 20, 1 << 30, 1 << 62]))


@pytest.mark.slow  # a second of CPU
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 2**64), st.integers(0, 2**64))
def test_hypothesis_headers_only_raise_image_refused(tail, file_size, limit):
    """Hypothesis-made data after a plausible v3 start."""
    start = b"QFI\xfb\x00\x00\x00\x03" + bytes(12) + b"\x00\x00\x00\x10"
    vet(start + tail, file_size, limit)
    vet(tail, file_size, limit)


def test_good_header_parses(good_headers):
    """The unmutated good headers all pass the pure check."""
    for data in good_headers:
        assert qcow2.read_qcow2_header(data, 1 << 30, LIMIT).cluster_size >= 512


@given(data=st.binary(max_size=512), file_size=st.integers(0, 1 << 64))
@example(data=b"QFI\xfb", file_size=4)
@example(data=b"", file_size=0)
def test_the_header_reader_refuses_random_bytes_in_its_own_way(data, file_size):
    """Hypothesis-made bytes from the first one on: refused with ImageRefused, or safe."""
    vet(data, file_size)


def test_the_header_reader_accepts_the_real_images(real_headers):
    """Every plain image qemu-img makes passes; the one with a backing file does not."""
    accepted = [vet(data, size) for data, size in real_headers]
    assert all(accepted[:-1]), "plain qemu-img images are refused"
    assert accepted[-1] is None, "an image with a backing file passed"


mutation = st.tuples(st.integers(0, REAL_HEADER_BYTES - 1), st.integers(0, 255))
field_overwrite = st.tuples(st.sampled_from(range(0, 112, 4)),
                            st.sampled_from([0, 1, 2, 3, 8, 9, 21, 22, 0x7FFFFFFF, 0xFFFFFFFF]))


@pytest.mark.slow  # a second of CPU
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(which=st.integers(0, 5), flips=st.lists(mutation, max_size=8),
       fields=st.lists(field_overwrite, max_size=4), cut=st.integers(0, REAL_HEADER_BYTES),
       size_change=st.integers(-(1 << 20), 1 << 20), max_virtual_size=st.integers(0, 1 << 62))
def test_the_header_reader_refuses_mutated_headers_in_its_own_way(
        real_headers, which, flips, fields, cut, size_change, max_virtual_size):
    """Real headers with bytes flipped, 32-bit fields overwritten, cut short, and other file
    sizes and limits (hypothesis): refused with ImageRefused, or safe."""
    data, file_size = real_headers[which]
    data = bytearray(data)
    for offset, byte in flips:
        data[offset] = byte
    for offset, value in fields:
        struct.pack_into(">I", data, offset, value)
    vet(bytes(data[:cut]), max(0, file_size + size_change), max_virtual_size)
