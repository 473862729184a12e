"""qcow2.py against real images made by qemu-img and qemu-io, good and hostile."""

from __future__ import annotations

import random
import shutil
import socket
import struct
from pathlib import Path

import pytest
import sample_images as images
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2

TIB = 1 << 40
LIMIT = 2 * TIB  # MAX_VIRTUAL_SIZE's default
PASSWD = Path("/etc/passwd")


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slow_images(tmp_path_factory) -> dict[str, Path]:
    """LUKS images take seconds to create, so each is made once for the whole run."""
    directory = tmp_path_factory.mktemp("luks")
    made = {"luks_qcow2": images.luks_qcow2(directory), "raw_luks": images.raw_luks(directory)}
    header_only = directory / "luks-header-only.qcow2"
    shutil.copy(made["luks_qcow2"], header_only)
    made["luks_header_only"] = images.patch_u32(header_only, images.CRYPT_METHOD, 0)
    return made


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

def header(offset: int, value: int, width: int = 8):
    """Maker of a good image with one header field patched."""
    return lambda d: images.patched(d, offset, value, width)


def extension(kind: int, payload: bytes):
    """Maker of a good image with a header extension added."""
    return lambda d: images.with_extension(images.good_v3(d), kind, payload)


def case(name, maker, expected, *, qemu=False, limit=LIMIT):
    """One hostile image: its maker, the refusal it must get, whether qemu-img may see it."""
    return pytest.param(maker, expected, qemu, limit, id=name)


HOSTILE = [
    # Not QCOW2 at all.
    case("empty", images.empty, "not in QCOW2 format (the file is empty)"),
    case("raw", images.raw, "not in QCOW2 format (it does not start with the QCOW2 signature)"),
    case("random", images.random_bytes, "not in QCOW2 format"),
    case("vmdk", lambda d: images.other_format(d, "vmdk"), "not in QCOW2 format (it is a VMDK"),
    case("vmdk-flat-passwd", images.vmdk_flat_descriptor, "(it is a VMDK descriptor)"),
    case("vdi", lambda d: images.other_format(d, "vdi"), "(it is a VDI image)"),
    case("vhd", lambda d: images.other_format(d, "vpc"), "(it is a VHD image)"),
    case("vhdx", lambda d: images.other_format(d, "vhdx"), "(it is a VHDX image)"),
    case("qed", lambda d: images.other_format(d, "qed"), "(it is a QED image)"),
    case("qcow-v1", lambda d: images.other_format(d, "qcow"), "unsupported QCOW2 version 1"),
    case("raw-luks", "raw_luks", "(it is a LUKS-encrypted raw image)"),
    case("gzip", images.gzipped, "(it is gzip-compressed); decompress it"),
    # Broken QCOW2.
    case("garbage-after-magic", images.garbage_after_magic, "unsupported QCOW2 version"),
    case("truncated-header", images.truncated_header, "the header is truncated"),
    case("truncated-body", images.truncated_body, "qemu-img check found", qemu=True),
    case("zeroed-refcounts", images.zeroed_refcounts, "qemu-img check found", qemu=True),
    case("version-4", header(images.VERSION, 4, 4), "unsupported QCOW2 version 4"),
    case("header-length-small", header(images.HEADER_LENGTH, 72, 4), "invalid header length 72"),
    case("header-length-odd", header(images.HEADER_LENGTH, 108, 4), "invalid header length 108"),
    case("header-length-huge", header(images.HEADER_LENGTH, 2**32 - 8, 4), "invalid header length"),
    case("extension-too-long", lambda d: images.patch_u32(images.good_v3(d), 116, 2**32 - 1),
         "a header extension runs past the first cluster"),
    case("extensions-unterminated", lambda d: images.patch(
        images.good_v3(d), 112, struct.pack(">II", 1, 65536 - 128) + b"\xff" * (65536 - 120)),
        "a header extension runs past the first cluster"),
    # References to other files.
    case("backing-path", images.backing_path,
         "the image has a backing file; make a self-contained"),
    case("backing-passwd", lambda d: images.with_backing(d, str(PASSWD)), "has a backing file"),
    case("backing-json", lambda d: images.with_backing(
        d, 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}'),
        "has a backing file"),
    case("backing-http", lambda d: images.with_backing(d, "http://127.0.0.1:9/x"),
         "has a backing file"),
    case("backing-nbd", lambda d: images.with_backing(d, "nbd://127.0.0.1:9/x"),
         "has a backing file"),
    case("backing-size-only", header(images.BACKING_OFFSET + 8, 11, 4), "has a backing file"),
    case("backing-format-extension", extension(images.EXT_BACKING_FORMAT, b"raw"),
         "has a backing file"),
    case("data-file", images.data_file, "the image uses an external data file"),
    case("data-file-passwd", lambda d: images.with_extension(
        images.data_file(d), images.EXT_DATA_FILE, str(PASSWD).encode()), "external data file"),
    case("data-file-extension-only", images.data_file_extension_only, "external data file"),
    case("data-file-bit-only", lambda d: images.set_incompatible(images.good_v3(d), 1 << 2),
         "external data file"),
    case("data-file-raw-bit", header(images.AUTOCLEAR, 1 << 1), "external data file"),
    # Encryption.
    case("luks", "luks_qcow2", "the image is encrypted (LUKS encryption)"),
    case("aes", images.aes_qcow2, "the image is encrypted (legacy AES encryption)"),
    case("crypt-method-7", header(images.CRYPT_METHOD, 7, 4), "encrypted (unknown encryption)"),
    case("luks-extension-only", "luks_header_only", "the image is encrypted"),
    # Abuse of header fields.
    case("exabyte", images.exabyte, "the virtual size 1 EiB (1152921504606846976 bytes) is larger"
         " than the limit of 2 TiB"),
    case("size-2^60-no-limit", header(images.SIZE, 1 << 60), "larger than the limit of 1 PiB",
         limit=1 << 64),
    case("size-2^64-1", header(images.SIZE, 2**64 - 1), "larger than the limit of 2 TiB"),
    case("over-limit", lambda d: images.good_v3(d, size="2G"), "the virtual size 2 GiB",
         limit=1 << 30),
    case("size-not-sectors", header(images.SIZE, (1 << 20) + 1), "not a multiple of 512 bytes"),
    case("unknown-incompatible-bit", lambda d: images.set_incompatible(images.good_v3(d), 1 << 5),
         "unknown incompatible features (bits 0x20)"),
    case("incompatible-bit-63", lambda d: images.set_incompatible(images.good_v3(d), 1 << 63),
         "unknown incompatible features (bits 0x8000000000000000)"),
    case("corrupt-bit", lambda d: images.set_incompatible(images.good_v3(d), 1 << 1),
         "the image is marked corrupt; repair it with `qemu-img check -r all"),
    case("dirty-bit", lambda d: images.set_incompatible(images.good_v3(d), 1 << 0),
         "not closed cleanly (dirty flag set); repair it with `qemu-img check -r all"),
    case("compression-type-2", lambda d: images.patch(
        images.set_incompatible(images.good_v3(d), 1 << 3), images.COMPRESSION_TYPE, b"\x02"),
        "invalid compression type 2"),
    case("zstd-without-bit", lambda d: images.patch(
        images.good_v3(d), images.COMPRESSION_TYPE, b"\x01"), "invalid compression type 1"),
    case("l1-size-absurd", header(images.L1_SIZE, 2**31 - 1, 4), "invalid L1 table size"),
    case("l1-size-too-small", header(images.L1_SIZE, 0, 4), "invalid L1 table size 0"),
    case("l1-offset-past-end", header(images.L1_OFFSET, 1 << 40), "invalid L1 table (misaligned"),
    case("l1-offset-unaligned", header(images.L1_OFFSET, 0x30008), "invalid L1 table (misaligned"),
    case("cluster-bits-30", header(images.CLUSTER_BITS, 30, 4), "invalid cluster size 2^30"),
    case("cluster-bits-8", header(images.CLUSTER_BITS, 8, 4), "invalid cluster size 2^8"),
    case("refcount-order-7", header(images.REFCOUNT_ORDER, 7, 4), "invalid refcount width 2^7"),
    case("reftable-huge", header(images.REFTABLE_OFFSET + 8, 2**32 - 1, 4),
         "invalid refcount table size"),
    case("reftable-past-end", header(images.REFTABLE_OFFSET, 1 << 30), "invalid refcount table"),
    case("snapshots-absurd", header(images.NB_SNAPSHOTS, 2**32 - 1, 4),
         "invalid snapshot table"),
    case("snapshots-nowhere", header(images.NB_SNAPSHOTS, 1, 4), "invalid snapshot table"),
]


@pytest.mark.parametrize("maker, expected, qemu, limit", HOSTILE)
def test_hostile_image_is_refused(tmp_path, slow_images, qemu_img_calls, maker, expected,
                                  qemu, limit):
    """Each hostile upload gets its own rule's message; qemu-img never sees the worst."""
    path = slow_images[maker] if isinstance(maker, str) else maker(tmp_path)
    message = refusal(path, limit)
    assert expected in message
    assert bool(qemu_img_calls) == qemu


def test_messages_never_show_passwd(tmp_path, qemu_img_calls):
    """No refusal of an image naming /etc/passwd echoes the name or the content."""
    passwd = PASSWD.read_text()
    makers = [images.vmdk_flat_descriptor, lambda d: images.with_backing(d, str(PASSWD)),
              lambda d: images.with_extension(images.data_file(d), images.EXT_DATA_FILE,
                                              str(PASSWD).encode())]
    for number, maker in enumerate(makers):
        directory = tmp_path / str(number)
        directory.mkdir()
        message = refusal(maker(directory))
        assert "passwd" not in message
        assert not any(line and line in message for line in passwd.splitlines())
    assert qemu_img_calls == []


# --- good images -------------------------------------------------------------------------

GOOD = [
    pytest.param(images.good_v2, 2, 1 << 20, 1 << 16, id="v2"),
    pytest.param(images.good_v3, 3, 1 << 20, 1 << 16, id="v3"),
    pytest.param(images.with_data, 3, 1 << 20, 1 << 16, id="qemu-io-data"),
    pytest.param(images.compressed, 3, 1 << 20, 1 << 16, id="compressed"),
    pytest.param(images.zstd, 3, 1 << 20, 1 << 16, id="zstd"),
    pytest.param(images.extended_l2, 3, 1 << 20, 1 << 16, id="extended-l2"),
    pytest.param(images.snapshot_and_bitmap, 3, 1 << 20, 1 << 16, id="snapshot-and-bitmap"),
    pytest.param(images.leaked, 3, 1 << 20, 1 << 16, id="leaked-cluster"),
    pytest.param(lambda d: images.create(d, "l.qcow2", "-o", "lazy_refcounts=on"),
                 3, 1 << 20, 1 << 16, id="lazy-refcounts"),
    pytest.param(lambda d: images.create(d, "c.qcow2", "-o", "cluster_size=512"),
                 3, 1 << 20, 512, id="cluster-512"),
    pytest.param(lambda d: images.create(d, "c.qcow2", "-o", "cluster_size=2M"),
                 3, 1 << 20, 1 << 21, id="cluster-2M"),
    pytest.param(lambda d: images.good_v3(d, size="0"), 3, 0, 1 << 16, id="empty-disk"),
    pytest.param(lambda d: images.good_v3(d, size="2T"), 3, LIMIT, 1 << 16, id="at-the-limit"),
]


@pytest.mark.parametrize("maker, version, virtual_size, cluster_size", GOOD)
def test_good_image_is_accepted(tmp_path, qemu_img_calls, maker, version, virtual_size,
                                cluster_size):
    """Healthy self-contained images pass, after qemu-img info and check both ran."""
    info = qcow2.inspect_qcow2(str(maker(tmp_path)), LIMIT)
    assert info == qcow2.ImageInfo(virtual_size, version, cluster_size)
    assert [call[0] for call in qemu_img_calls] == ["info", "check"]


def test_leaked_cluster_image_really_has_leaks(tmp_path):
    """The leaked-cluster image exercises check's exit status 3, which is accepted."""
    path = images.leaked(tmp_path)
    spec = qcow2._image_spec(str(path))
    assert qcow2._run_qemu_img("check", "-f", "qcow2", "--output=json", spec).returncode == 3


def test_relative_path_is_accepted(tmp_path, monkeypatch):
    """A relative path is made absolute before it goes into qemu-img's options."""
    images.good_v3(tmp_path, "rel,with=odd:chars.qcow2")
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
    qcow2.inspect_qcow2(str(images.with_data(tmp_path)), LIMIT)
    assert sizes == [qcow2.HEADER_READ_SIZE]


# --- qemu-img, second line of defence ----------------------------------------------------

def test_http_backing_file_is_never_contacted(tmp_path, listener):
    """Neither the header check nor qemu-img (run anyway) connects to a backing URL."""
    port = listener.getsockname()[1]
    path = images.with_backing(tmp_path, f"http://127.0.0.1:{port}/disk.raw")
    assert "has a backing file" in refusal(path)
    for command in ("info", "check"):
        qcow2._run_qemu_img(command, "-f", "qcow2", "--output=json", qcow2._image_spec(str(path)))
    assert not connected(listener)


def permissive_header(data: bytes, file_size: int, max_virtual_size: int) -> qcow2.Qcow2Header:
    """A stand-in for read_qcow2_header that misses everything: a header check with a bug."""
    return qcow2.Qcow2Header(3, 0, 0, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0)


@pytest.mark.parametrize("maker, expected", [
    (lambda d, port: images.with_backing(d, f"http://127.0.0.1:{port}/x"), "has a backing file"),
    (lambda d, port: images.with_backing(d, f"nbd://127.0.0.1:{port}"), "has a backing file"),
    (lambda d, port: images.with_extension(
        images.data_file(d), images.EXT_DATA_FILE,
        f'json:{{"driver":"nbd","host":"127.0.0.1","port":"{port}"}}'.encode()),
     "external data file"),
    (lambda d, port: images.data_file(d), "external data file"),
    (lambda d, port: images.set_incompatible(images.good_v3(d), 1 << 0), "not closed cleanly"),
    (lambda d, port: images.set_incompatible(images.good_v3(d), 1 << 1), "marked corrupt"),
    (lambda d, port: images.good_v3(d, size="2M"), "qemu-img info disagrees"),
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
    path = images.data_file(tmp_path)
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
    assert "output allowance" in refusal(images.good_v3(tmp_path))


def test_qemu_img_that_hangs_is_killed(tmp_path, monkeypatch):
    """A qemu-img that never finishes is killed at the timeout and the upload refused."""
    fake_qemu_img(monkeypatch, tmp_path, "exec sleep 30")
    monkeypatch.setattr(qcow2, "TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(qcow2, "WALL_PER_CPU_SECOND", 0.1)
    assert "qemu-img took longer than 0.5 s" in refusal(images.good_v3(tmp_path))


def test_qemu_img_that_spins_hits_the_cpu_limit(tmp_path, monkeypatch):
    """A qemu-img that burns CPU is stopped by RLIMIT_CPU and the upload refused."""
    fake_qemu_img(monkeypatch, tmp_path, "while :; do :; done")
    monkeypatch.setattr(qcow2, "CPU_BASE_SECONDS", 1)
    assert "needs more CPU time than the 1 s allowed" in refusal(images.good_v3(tmp_path))


def test_qemu_img_failing_to_open_is_refused(tmp_path, monkeypatch):
    """An info that fails is a refusal whose message hides qemu-img's own words and paths."""
    fake_qemu_img(monkeypatch, tmp_path, "echo \"qemu-img: Could not open '$*'\" >&2; exit 1")
    message = refusal(images.good_v3(tmp_path))
    assert "qemu-img cannot open it" in message and "Could not open" not in message


def test_check_that_cannot_finish_is_refused(tmp_path, monkeypatch):
    """A check exit status other than 0, 2 or 3 is a refusal."""
    info = '{"format": "qcow2", "virtual-size": 1048576, "cluster-size": 65536, ' \
           '"format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}'
    fake_qemu_img(monkeypatch, tmp_path, f"[ \"$1\" = info ] && echo '{info}' && exit 0; exit 1")
    assert "qemu-img check could not finish" in refusal(images.good_v3(tmp_path))


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
    makers = [images.good_v2, images.good_v3, images.zstd, images.snapshot_and_bitmap,
              images.extended_l2]
    return [maker(directory).read_bytes()[:qcow2.HEADER_READ_SIZE] for maker in makers]


def vet(data: bytes, file_size: int, limit: int = LIMIT) -> None:
    """read_qcow2_header either refuses with ImageRefused or returns a header that is safe."""
    try:
        parsed = qcow2.read_qcow2_header(data, file_size, limit)
    except qcow2.ImageRefused as exc:
        assert str(exc).startswith(qcow2.PREFIX)
        return
    assert parsed.version in (2, 3) and 9 <= parsed.cluster_bits <= 21
    assert parsed.virtual_size <= limit
    assert parsed.incompatible_features & 0b111 == 0  # not dirty, corrupt, or external data
    assert not {images.EXT_DATA_FILE, images.EXT_CRYPTO, images.EXT_BACKING_FORMAT} & set(
        parsed.extensions)
    assert struct.unpack_from(">QI", data, 8) == (0, 0)  # no backing file
    assert struct.unpack_from(">I", data, 32) == (0,)  # not encrypted


def test_random_bytes_only_raise_image_refused():
    """Random data, with and without the magic, of every short length."""
    rng = random.Random(1234)
    for length in [*range(130), 512, 4096, 65536]:
        for prefix in (b"", b"QFI\xfb"):
            data = prefix + rng.randbytes(length)
            vet(data, rng.choice([0, len(data), 1 << 20, 1 << 62]))


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
