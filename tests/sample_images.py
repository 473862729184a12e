"""Good and hostile disk images for tests, made with the real qemu-img and qemu-io.

Every maker takes a directory (pytest's tmp_path), writes one small image in it and returns
its path. Hostile images that qemu-img refuses to create are made by patching the bytes of a
good one. Other test files may use these makers too.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import subprocess
import time
from pathlib import Path

MIB = 1 << 20
SECRET = "secret,id=sec0,data=imagestore-test"
# Offsets of header fields, from docs/interop/qcow2.txt in the QEMU sources.
VERSION, BACKING_OFFSET, CLUSTER_BITS, SIZE, CRYPT_METHOD = 4, 8, 20, 24, 32
L1_SIZE, L1_OFFSET, REFTABLE_OFFSET, NB_SNAPSHOTS = 36, 40, 48, 60
INCOMPATIBLE, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH, COMPRESSION_TYPE = 72, 88, 96, 100, 104
EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_DATA_FILE = 0xE2792ACA, 0x0537BE77, 0x44415441


def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run a command (qemu-img, qemu-io), failing loudly with its stderr."""
    done = subprocess.run([str(arg) for arg in args], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def create(directory: Path, name: str, *options: str, size: str = "1M",
           fmt: str = "qcow2") -> Path:
    """qemu-img create -f FMT [OPTIONS] DIRECTORY/NAME SIZE."""
    path = directory / name
    run("qemu-img", "create", "-q", "-f", fmt, *options, path, size)
    return path


def write_data(path: Path, *spans: tuple[int, int], pattern: int = 0xAB) -> Path:
    """Write a byte pattern into the image's guest view with qemu-io."""
    commands = [arg for start, length in spans
                for arg in ("-c", f"write -P {pattern} {start} {length}")]
    run("qemu-io", "-f", "qcow2", *commands, path)
    return path


def patch(path: Path, offset: int, data: bytes) -> Path:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)
    return path


def patch_u32(path: Path, offset: int, value: int) -> Path:
    """Overwrite a big-endian 32-bit header field."""
    return patch(path, offset, struct.pack(">I", value))


def patch_u64(path: Path, offset: int, value: int) -> Path:
    """Overwrite a big-endian 64-bit header field."""
    return patch(path, offset, struct.pack(">Q", value))


def read_u64(path: Path, offset: int) -> int:
    """Read a big-endian 64-bit field."""
    with open(path, "rb") as file:
        file.seek(offset)
        return struct.unpack(">Q", file.read(8))[0]


def set_incompatible(path: Path, bits: int) -> Path:
    """OR bits into a v3 image's incompatible feature field."""
    return patch_u64(path, INCOMPATIBLE, read_u64(path, INCOMPATIBLE) | bits)


# --- good images -------------------------------------------------------------------------

def good_v3(directory: Path, name: str = "good.qcow2", size: str = "1M") -> Path:
    """A fresh, empty QCOW2 v3 image."""
    return create(directory, name, size=size)


def good_v2(directory: Path) -> Path:
    """A QCOW2 v2 image (compat=0.10), as old qemu-img versions make."""
    return create(directory, "v2.qcow2", "-o", "compat=0.10")


def with_data(directory: Path, name: str = "data.qcow2") -> Path:
    """A v3 image with 512 KiB of data written by qemu-io."""
    return write_data(good_v3(directory, name), (0, 512 * 1024))


def compressed(directory: Path) -> Path:
    """An image whose clusters are compressed (qemu-img convert -c)."""
    source = with_data(directory, "uncompressed.qcow2")
    out = directory / "compressed.qcow2"
    run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", source, out)
    return out


def zstd(directory: Path) -> Path:
    """An image with zstd compression type and a compressed cluster."""
    path = create(directory, "zstd.qcow2", "-o", "compression_type=zstd")
    run("qemu-io", "-f", "qcow2", "-c", "write -c -P 171 0 64k", path)
    return path


def extended_l2(directory: Path) -> Path:
    """An image with extended L2 entries (subclusters)."""
    return write_data(create(directory, "extl2.qcow2", "-o", "extended_l2=on"), (0, 4096))


def snapshot_and_bitmap(directory: Path) -> Path:
    """An image with an internal snapshot and a persistent dirty bitmap."""
    path = with_data(directory, "snap.qcow2")
    run("qemu-img", "snapshot", "-c", "s1", path)
    run("qemu-img", "bitmap", "--add", path, "b0")
    return path


def leaked(directory: Path) -> Path:
    """An image with one leaked cluster: qemu-img check exits 3, which is harmless."""
    path = with_data(directory, "leaked.qcow2")
    cluster = 1 << 16
    refblock = read_u64(path, read_u64(path, REFTABLE_OFFSET))
    index = -(-path.stat().st_size // cluster)
    os.truncate(path, (index + 1) * cluster)
    return patch(path, refblock + 2 * index, struct.pack(">H", 1))  # 16-bit refcounts


# --- not QCOW2 at all --------------------------------------------------------------------

def empty(directory: Path) -> Path:
    """An empty file."""
    path = directory / "empty.qcow2"
    path.write_bytes(b"")
    return path


def raw(directory: Path) -> Path:
    """A raw disk image with some data."""
    path = create(directory, "disk.raw", fmt="raw")
    return patch(path, 0, b"\xeb\x63\x90" + bytes(509) + b"\x55\xaa")


def random_bytes(directory: Path, seed: int = 1) -> Path:
    """64 KiB of random bytes."""
    path = directory / "random.bin"
    path.write_bytes(random.Random(seed).randbytes(64 * 1024))
    return path


def other_format(directory: Path, fmt: str) -> Path:
    """An image of another format: vmdk, vdi, vpc (VHD), vhdx, qed or qcow (version 1)."""
    return create(directory, f"disk.{fmt}", fmt=fmt)


def vmdk_flat_descriptor(directory: Path, target: str = "/etc/passwd") -> Path:
    """A monolithicFlat VMDK descriptor whose extent is a host file."""
    path = directory / "flat.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\n# Extent description\n'
                    f'RW 8 FLAT "{target}" 0\n\nddb.virtualHWVersion = "4"\n')
    return path


def raw_luks(directory: Path) -> Path:
    """A raw LUKS-encrypted image (qemu-img create -f luks)."""
    return _retry(lambda: create(directory, "disk.luks", "--object", SECRET,
                                 "-o", "key-secret=sec0,iter-time=10", fmt="luks"))


def gzipped(directory: Path) -> Path:
    """A gzip-compressed QCOW2 image."""
    path = directory / "good.qcow2.gz"
    path.write_bytes(gzip.compress(good_v3(directory, "to-gzip.qcow2").read_bytes()))
    return path


# --- broken QCOW2 ------------------------------------------------------------------------

def garbage_after_magic(directory: Path, seed: int = 2) -> Path:
    """The QCOW2 magic followed by random bytes."""
    path = directory / "garbage.qcow2"
    path.write_bytes(b"QFI\xfb" + random.Random(seed).randbytes(64 * 1024))
    return path


def truncated_header(directory: Path) -> Path:
    """The first 48 bytes of a good image."""
    path = good_v3(directory, "truncated-header.qcow2")
    os.truncate(path, 48)
    return path


def truncated_body(directory: Path) -> Path:
    """An image with data whose last data clusters were cut off."""
    path = with_data(directory, "truncated-body.qcow2")
    os.truncate(path, path.stat().st_size - 256 * 1024)
    return path


def zeroed_refcounts(directory: Path) -> Path:
    """An image whose refcount block is all zeros."""
    path = with_data(directory, "zeroed-refcounts.qcow2")
    return patch(path, read_u64(path, read_u64(path, REFTABLE_OFFSET)), bytes(1 << 16))


# --- references to other files -----------------------------------------------------------

def with_backing(directory: Path, backing: str, backing_fmt: str = "raw",
                 name: str = "overlay.qcow2") -> Path:
    """An overlay whose backing file is BACKING (a path, json: or URL), never opened here."""
    return create(directory, name, "-u", "-b", backing, "-F", backing_fmt)


def backing_path(directory: Path) -> Path:
    """An overlay on a real base image in the same directory."""
    base = good_v3(directory, "base.qcow2")
    return create(directory, "overlay.qcow2", "-b", str(base), "-F", "qcow2")


def data_file(directory: Path, target: str | None = None) -> Path:
    """An image with an external data file (-o data_file=...)."""
    target = target or str(directory / "external.raw")
    return create(directory, "data-file.qcow2", "-o", f"data_file={target}")


def data_file_extension_only(directory: Path) -> Path:
    """An external data file extension left in the header without its feature bit."""
    path = data_file(directory)
    return patch_u64(path, INCOMPATIBLE, read_u64(path, INCOMPATIBLE) & ~(1 << 2))


# --- encryption --------------------------------------------------------------------------

def _retry(make, attempts: int = 20):
    """Call make() until it succeeds: LUKS creation fails now and then (docs/platform.md).

    qemu-img times a PBKDF2 run by thread CPU time and gives up ("Unable to get accurate CPU
    usage") when that reads 0 ms; on a busy machine that happens often, but fails fast.
    """
    for attempt in range(attempts):
        try:
            return make()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def luks_qcow2(directory: Path) -> Path:
    """A QCOW2 image with LUKS encryption (encrypt.format=luks)."""
    options = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    return _retry(lambda: create(directory, "luks.qcow2", "--object", SECRET, "-o", options))


def aes_qcow2(directory: Path) -> Path:
    """A QCOW2 image with legacy AES encryption; patched in when qemu-img will not make one."""
    try:
        return create(directory, "aes.qcow2", "--object", SECRET,
                      "-o", "encrypt.format=aes,encrypt.key-secret=sec0")
    except RuntimeError:
        return patch_u32(good_v3(directory, "aes.qcow2"), CRYPT_METHOD, 1)


def luks_header_only(directory: Path) -> Path:
    """A LUKS QCOW2 image whose crypt_method was zeroed, leaving the crypto header extension."""
    return patch_u32(luks_qcow2(directory), CRYPT_METHOD, 0)


# --- abuse of header fields --------------------------------------------------------------

def exabyte(directory: Path) -> Path:
    """A real 1 EiB image (2 MiB clusters keep it to a 22 MiB file)."""
    return create(directory, "exabyte.qcow2", "-o", "cluster_size=2M", size="1E")


def patched(directory: Path, offset: int, value: int, width: int = 8,
            name: str = "patched.qcow2") -> Path:
    """A good v3 image with one header field overwritten."""
    path = good_v3(directory, name)
    return (patch_u64 if width == 8 else patch_u32)(path, offset, value)


def costly_check(directory: Path, l1_entries: int = 1000, name: str = "costly.qcow2") -> Path:
    """A small file that costs `qemu-img check` CPU without end (a crafted worst case).

    check reads the L2 table behind every L1 entry and counts a reference for every entry
    of it. Here every one of l1_entries L1 entries names the same L2 table, whose 8192
    entries all name the same data cluster: each 8 bytes of L1 buy 8192 references, and
    past 65535 references to one cluster every further one is a refcount overflow, which
    check reports in a line of its own. The default file is 448 KiB and costs about 9 CPU
    seconds (docs/security.md); check's time grows with l1_entries, up to QEMU's 4M.
    """
    cluster = 1 << 16
    path = write_data(good_v3(directory, name), (0, cluster))
    l2_offset = read_u64(path, read_u64(path, L1_OFFSET)) & ((1 << 56) - 1) & ~(cluster - 1)
    data_entry = read_u64(path, l2_offset)
    patch(path, l2_offset, struct.pack(">Q", data_entry) * (cluster // 8))
    l1_offset = -(-path.stat().st_size // cluster) * cluster
    patch(path, l1_offset, struct.pack(">Q", l2_offset) * l1_entries)
    os.truncate(path, -(-path.stat().st_size // cluster) * cluster)
    patch_u32(path, L1_SIZE, l1_entries)
    return patch_u64(path, L1_OFFSET, l1_offset)


# --- header extensions -------------------------------------------------------------------

def extensions(path: Path) -> list[tuple[int, bytes]]:
    """The header extensions of a good image, as (type, payload) pairs."""
    data = path.read_bytes()[:1 << 16]
    offset = 72 if struct.unpack_from(">I", data, VERSION)[0] == 2 else (
        struct.unpack_from(">I", data, 100)[0])
    found = []
    while (kind_length := struct.unpack_from(">II", data, offset))[0]:
        kind, length = kind_length
        found.append((kind, data[offset + 8:offset + 8 + length]))
        offset += 8 + (length + 7) // 8 * 8
    return found


def set_extensions(path: Path, found: list[tuple[int, bytes]]) -> Path:
    """Rewrite the header extension area of an image (it must still fit in cluster 0)."""
    data = path.read_bytes()[:1 << 16]
    start = 72 if struct.unpack_from(">I", data, VERSION)[0] == 2 else (
        struct.unpack_from(">I", data, 100)[0])
    area = b"".join(struct.pack(">II", kind, len(payload)) + payload
                    + bytes(-len(payload) % 8) for kind, payload in found) + bytes(8)
    if start + len(area) > 1 << struct.unpack_from(">I", data, CLUSTER_BITS)[0]:
        raise ValueError("extensions do not fit in the first cluster")
    return patch(path, start, area)


def with_extension(path: Path, kind: int, payload: bytes) -> Path:
    """Add a header extension, or replace the payload of one of that type."""
    others = [(k, p) for k, p in extensions(path) if k != kind]
    return set_extensions(path, [(kind, payload), *others])
