"""Images for the inspection and upload tests: the HOSTILE and GOOD cases, each with what
qcow2.inspect_qcow2 must answer, and the LUKS images that take seconds to make.

test_qcow2.py runs the cases against inspect_qcow2 directly, test_hostile_uploads.py through
POST /images: one list serves both. A pytest plugin of conftest.py (its `pytest_plugins`).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import sample_images

TIB = 1 << 40
LIMIT = 2 * TIB  # MAX_VIRTUAL_SIZE's default
PASSWD = Path("/etc/passwd")


# --- the LUKS images ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def slow_images(tmp_path_factory) -> dict[str, Path]:
    """LUKS images take seconds to create, so each is made once for the whole run; the
    cases that name one by a string are marked slow."""
    directory = tmp_path_factory.mktemp("luks")
    made = {"luks_qcow2": sample_images.luks_qcow2(directory),
            "raw_luks": sample_images.raw_luks(directory)}
    header_only = directory / "luks-header-only.qcow2"
    shutil.copy(made["luks_qcow2"], header_only)
    made["luks_header_only"] = sample_images.patch_u32(header_only, sample_images.CRYPT_METHOD, 0)
    return made


@pytest.fixture
def case_image(request, tmp_path):
    """A function returning the image of a case: made by its maker in tmp_path, or, for a
    maker that is a string, that one of slow_images (asked for only then: it is slow)."""

    def make(maker) -> Path:
        if isinstance(maker, str):
            return request.getfixturevalue("slow_images")[maker]
        return maker(tmp_path)

    return make


# --- hostile images ----------------------------------------------------------------------

def header(offset: int, value: int, width: int = 8):
    """Maker of a good image with one header field patched."""
    return lambda d: sample_images.patched(d, offset, value, width)


def extension(kind: int, payload: bytes):
    """Maker of a good image with a header extension added."""
    return lambda d: sample_images.with_extension(sample_images.good_v3(d), kind, payload)


def other_format(fmt: str):
    """Maker of an image of another format (qemu-img create -f FMT)."""
    return lambda d: sample_images.other_format(d, fmt)


def incompatible(bits: int):
    """Maker of a good v3 image with bits set in its incompatible features."""
    return lambda d: sample_images.set_incompatible(sample_images.good_v3(d), bits)


def case(name, maker, expected, *, qemu=False, limit=LIMIT):
    """One hostile image: its maker, the refusal it must get, whether qemu-img may see it.
    A maker that is a string names one of slow_images: the case is slow."""
    marks = [pytest.mark.slow] if isinstance(maker, str) else []
    return pytest.param(maker, expected, qemu, limit, id=name, marks=marks)


HOSTILE = [
    # Not QCOW2 at all.
    case("empty", sample_images.empty, "not in QCOW2 format (the file is empty)"),
    case("raw", sample_images.raw,
         "not in QCOW2 format (it does not start with the QCOW2 signature)"),
    case("random", sample_images.random_bytes, "not in QCOW2 format"),
    case("vmdk", other_format("vmdk"), "not in QCOW2 format (it is a VMDK"),
    case("vmdk-flat-passwd", sample_images.vmdk_flat_descriptor, "(it is a VMDK descriptor)"),
    case("vdi", other_format("vdi"), "(it is a VDI image)"),
    case("vhd", other_format("vpc"), "(it is a VHD image)"),
    case("vhdx", other_format("vhdx"), "(it is a VHDX image)"),
    case("qed", other_format("qed"), "(it is a QED image)"),
    case("qcow-v1", other_format("qcow"), "unsupported QCOW2 version 1"),
    case("raw-luks", "raw_luks", "(it is a LUKS-encrypted raw image)"),
    case("gzip", sample_images.gzipped, "(it is gzip-compressed); decompress it"),
    # Broken QCOW2.
    case("garbage-after-magic", sample_images.garbage_after_magic, "unsupported QCOW2 version"),
    case("truncated-header", sample_images.truncated_header, "the header is truncated"),
    case("truncated-body", sample_images.truncated_body, "qemu-img check found", qemu=True),
    case("zeroed-refcounts", sample_images.zeroed_refcounts, "qemu-img check found",
         qemu=True),
    case("version-4", header(sample_images.VERSION, 4, 4), "unsupported QCOW2 version 4"),
    case("header-length-small", header(sample_images.HEADER_LENGTH, 72, 4),
         "invalid header length 72"),
    case("header-length-odd", header(sample_images.HEADER_LENGTH, 108, 4),
         "invalid header length 108"),
    case("header-length-huge", header(sample_images.HEADER_LENGTH, 2**32 - 8, 4),
         "invalid header length"),
    case("extension-too-long",
         lambda d: sample_images.patch_u32(sample_images.good_v3(d), 116, 2**32 - 1),
         "a header extension runs past the first cluster"),
    case("extensions-unterminated", lambda d: sample_images.patch(
        sample_images.good_v3(d), 112,
        struct.pack(">II", 1, 65536 - 128) + b"\xff" * (65536 - 120)),
        "a header extension runs past the first cluster"),
    # References to other files.
    case("backing-path", sample_images.backing_path,
         "the image has a backing file; make a self-contained"),
    case("backing-passwd", lambda d: sample_images.with_backing(d, str(PASSWD)),
         "has a backing file"),
    case("backing-json", lambda d: sample_images.with_backing(
        d, 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}'),
        "has a backing file"),
    case("backing-http", lambda d: sample_images.with_backing(d, "http://127.0.0.1:9/x"),
         "has a backing file"),
    case("backing-nbd", lambda d: sample_images.with_backing(d, "nbd://127.0.0.1:9/x"),
         "has a backing file"),
    case("backing-size-only", header(sample_images.BACKING_OFFSET + 8, 11, 4),
         "has a backing file"),
    case("backing-format-extension", extension(sample_images.EXT_BACKING_FORMAT, b"raw"),
         "has a backing file"),
    case("data-file", sample_images.data_file, "the image uses an external data file"),
    case("data-file-passwd", lambda d: sample_images.with_extension(
        sample_images.data_file(d), sample_images.EXT_DATA_FILE, str(PASSWD).encode()),
        "external data file"),
    case("data-file-extension-only", sample_images.data_file_extension_only,
         "external data file"),
    case("data-file-bit-only", incompatible(1 << 2), "external data file"),
    case("data-file-raw-bit", header(sample_images.AUTOCLEAR, 1 << 1), "external data file"),
    # Encryption.
    case("luks", "luks_qcow2", "the image is encrypted (LUKS encryption)"),
    case("aes", sample_images.aes_qcow2, "the image is encrypted (legacy AES encryption)"),
    case("crypt-method-7", header(sample_images.CRYPT_METHOD, 7, 4),
         "encrypted (unknown encryption)"),
    case("luks-extension-only", "luks_header_only", "the image is encrypted"),
    # Abuse of header fields.
    case("exabyte", sample_images.exabyte,
         "the virtual size 1 EiB (1152921504606846976 bytes) is larger than the limit of 2 TiB"),
    case("size-2^60-no-limit", header(sample_images.SIZE, 1 << 60),
         "larger than the limit of 1 PiB", limit=1 << 64),
    case("size-2^64-1", header(sample_images.SIZE, 2**64 - 1), "larger than the limit of 2 TiB"),
    case("over-limit", lambda d: sample_images.good_v3(d, size="2G"), "the virtual size 2 GiB",
         limit=1 << 30),
    case("size-not-sectors", header(sample_images.SIZE, (1 << 20) + 1),
         "not a multiple of 512 bytes"),
    case("unknown-incompatible-bit", incompatible(1 << 5),
         "unknown incompatible features (bits 0x20)"),
    case("incompatible-bit-63", incompatible(1 << 63),
         "unknown incompatible features (bits 0x8000000000000000)"),
    case("corrupt-bit", incompatible(1 << 1),
         "the image is marked corrupt; repair it with `qemu-img check -r all"),
    case("dirty-bit", incompatible(1 << 0),
         "not closed cleanly (dirty flag set); repair it with `qemu-img check -r all"),
    case("compression-type-2", lambda d: sample_images.patch(
        incompatible(1 << 3)(d), sample_images.COMPRESSION_TYPE, b"\x02"),
        "invalid compression type 2"),
    case("zstd-without-bit", lambda d: sample_images.patch(
        sample_images.good_v3(d), sample_images.COMPRESSION_TYPE, b"\x01"),
        "invalid compression type 1"),
    case("l1-size-absurd", header(sample_images.L1_SIZE, 2**31 - 1, 4), "invalid L1 table size"),
    case("l1-size-too-small", header(sample_images.L1_SIZE, 0, 4), "invalid L1 table size 0"),
    case("l1-offset-past-end", header(sample_images.L1_OFFSET, 1 << 40),
         "invalid L1 table (misaligned"),
    case("l1-offset-unaligned", header(sample_images.L1_OFFSET, 0x30008),
         "invalid L1 table (misaligned"),
    case("cluster-bits-30", header(sample_images.CLUSTER_BITS, 30, 4), "invalid cluster size 2^30"),
    case("cluster-bits-8", header(sample_images.CLUSTER_BITS, 8, 4), "invalid cluster size 2^8"),
    case("refcount-order-7", header(sample_images.REFCOUNT_ORDER, 7, 4),
         "invalid refcount width 2^7"),
    case("reftable-huge", header(sample_images.REFTABLE_OFFSET + 8, 2**32 - 1, 4),
         "invalid refcount table size"),
    case("reftable-past-end", header(sample_images.REFTABLE_OFFSET, 1 << 30),
         "invalid refcount table"),
    case("snapshots-absurd", header(sample_images.NB_SNAPSHOTS, 2**32 - 1, 4),
         "invalid snapshot table"),
    case("snapshots-nowhere", header(sample_images.NB_SNAPSHOTS, 1, 4), "invalid snapshot table"),
]


# --- good images -------------------------------------------------------------------------

GOOD = [
    pytest.param(sample_images.good_v2, 2, 1 << 20, 1 << 16, id="v2"),
    pytest.param(sample_images.good_v3, 3, 1 << 20, 1 << 16, id="v3"),
    pytest.param(sample_images.with_data, 3, 1 << 20, 1 << 16, id="qemu-io-data"),
    pytest.param(sample_images.compressed, 3, 1 << 20, 1 << 16, id="compressed"),
    pytest.param(sample_images.zstd, 3, 1 << 20, 1 << 16, id="zstd"),
    pytest.param(sample_images.extended_l2, 3, 1 << 20, 1 << 16, id="extended-l2"),
    pytest.param(sample_images.snapshot_and_bitmap, 3, 1 << 20, 1 << 16, id="snapshot-and-bitmap"),
    pytest.param(sample_images.leaked, 3, 1 << 20, 1 << 16, id="leaked-cluster"),
    pytest.param(lambda d: sample_images.create(d, "l.qcow2", "-o", "lazy_refcounts=on"),
                 3, 1 << 20, 1 << 16, id="lazy-refcounts"),
    pytest.param(lambda d: sample_images.create(d, "c.qcow2", "-o", "cluster_size=512"),
                 3, 1 << 20, 512, id="cluster-512"),
    pytest.param(lambda d: sample_images.create(d, "c.qcow2", "-o", "cluster_size=2M"),
                 3, 1 << 20, 1 << 21, id="cluster-2M"),
    pytest.param(lambda d: sample_images.good_v3(d, size="0"), 3, 0, 1 << 16, id="empty-disk"),
    pytest.param(lambda d: sample_images.good_v3(d, size="2T"), 3, LIMIT, 1 << 16,
                 id="at-the-limit"),
]
