"""Decide whether an uploaded file is a QCOW2 image that is safe to hand to QEMU.

The header is read in Python first, so that an image naming another file (backing file,
external data file) never reaches qemu-img at all; then `qemu-img info` and `qemu-img check`
confirm the verdict, run with resource limits and with options that keep them from opening
anything but the file itself. docs/security.md says which attack each rule stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

# 7.2 is the oldest release series with the CVE-2024-4467 fix (in 7.2.13, and in 9.1): since
# then `qemu-img info` no longer opens a qcow2's external data file, so it stays a safe second
# line behind the header check. 7.2 also reads every feature the header check lets through
# (zstd compression from 5.1, extended L2 entries from 5.2), and the facts in docs/platform.md
# were measured on it.
MIN_QEMU_IMG_VERSION = (7, 2)

QEMU_IMG = "qemu-img"
HEADER_READ_SIZE = 64 * 1024  # header and extensions; qemu writes them well inside this
HARD_MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB: no configuration may let a larger disk through
TIMEOUT_SECONDS = 60  # wall clock, at least; a larger CPU budget gets more (WALL_PER_CPU_SECOND)
# CPU budget of each qemu-img run: a base for every file plus so much per whole GiB of it.
# An honest image needs far less (docs/security.md, measured); a small file whose metadata
# points at the same tables again and again needs without end, and is refused at its budget.
CPU_BASE_SECONDS = 2
CPU_SECONDS_PER_GIB = 3
WALL_PER_CPU_SECOND = 4  # a busy machine gives a run a share of a core, not all of it
GIB = 1 << 30
SLOT_POLL_SECONDS = 0.05  # how often the first upload waiting for a check slot looks for one
MEMORY_BYTES = 1 << 30
OUTPUT_BYTES = 4 << 20  # JSON from info/check; a normal image needs a few KiB
# prctl(PR_SET_PDEATHSIG) from the C library: Linux's way to have a child die with its parent.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
_PR_SET_PDEATHSIG = 1
# A fixed environment: no proxy variables, no QEMU_* module paths, messages in plain C.
_ENV = {"LC_ALL": "C", "PATH": "/usr/local/bin:/usr/bin:/bin"}

PREFIX = "File not a valid QCOW2 image: "
_CONVERT = "convert it with `qemu-img convert -O qcow2 in.img out.qcow2`"
_REMAKE = ("the file is damaged: upload it again, or make it anew from the source disk with "
           "`qemu-img convert -O qcow2 source.img out.qcow2`")
_FLATTEN = "make a self-contained copy with `qemu-img convert -O qcow2 in.qcow2 out.qcow2`"
_REPAIR = "repair it with `qemu-img check -r all in.qcow2` (keep a copy first) and upload again"
_DECRYPT = ("upload a decrypted copy made with `qemu-img convert --object secret,id=s0,file=KEY"
            " --image-opts driver=qcow2,file.filename=in.qcow2,encrypt.key-secret=s0"
            " -O qcow2 out.qcow2`")
_DECRYPT_RAW = ("upload a decrypted copy made with `qemu-img convert --object secret,id=s0,file=KEY"
                " --image-opts driver=luks,file.filename=in.img,key-secret=s0 -O qcow2 out.qcow2`")

_MAGIC = b"QFI\xfb"
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
_V3_HEADER = struct.Struct(">QQQII")  # feature bits, refcount_order, header_length at 72
_DIRTY, _CORRUPT, _DATA_FILE, _COMPRESSION, _EXTENDED_L2 = (1 << bit for bit in range(5))
_KNOWN_INCOMPATIBLE = _DIRTY | _CORRUPT | _DATA_FILE | _COMPRESSION | _EXTENDED_L2
_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
_EXT_BACKING_FORMAT, _EXT_CRYPTO, _EXT_DATA_FILE = 0xE2792ACA, 0x0537BE77, 0x44415441
_MAX_L1_BYTES, _MAX_REFTABLE_BYTES, _MAX_SNAPSHOTS = 32 << 20, 8 << 20, 65536  # qemu's own caps
_DECOMPRESS = "decompress it and upload the image itself"
_OTHER_FORMATS = (  # (offset, signature, what the file is, what to do)
    (0, b"\x1f\x8b", "gzip-compressed", _DECOMPRESS), (0, b"BZh", "bzip2-compressed", _DECOMPRESS),
    (0, b"\xfd7zXZ\x00", "xz-compressed", _DECOMPRESS),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed", _DECOMPRESS),
    (0, b"KDMV", "a VMDK image", _CONVERT),
    (0, b"# Disk DescriptorFile", "a VMDK descriptor", _CONVERT),
    (0, b"conectix", "a VHD image", _CONVERT), (0, b"vhdxfile", "a VHDX image", _CONVERT),
    (64, b"\x7f\x10\xda\xbe", "a VDI image", _CONVERT), (0, b"QED\x00", "a QED image", _CONVERT),
    (0, b"LUKS\xba\xbe", "a LUKS-encrypted raw image", _DECRYPT_RAW),
)


# The short, stable names of the rules a file can fail, one per kind of refusal: the label
# of the refused uploads in /metrics and the `rule` of the audit log (docs/observability.md).
REFUSAL_RULES = (
    "not_qcow2", "unsupported_version", "truncated", "malformed_header", "malformed_tables",
    "backing_file", "data_file", "encrypted", "corrupt", "dirty", "unknown_features",
    "virtual_size", "qemu_img_open", "qemu_img_mismatch", "qemu_img_limits", "check_failed",
)


class ImageRefused(Exception):
    """An upload that is not a safe QCOW2 image; str(exc) is the user-facing message, and
    rule the name of the rule it failed (one of REFUSAL_RULES)."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class ImageInfo:
    """What the store keeps about an accepted image."""

    virtual_size: int  # bytes, from the header and agreed by qemu-img info
    version: int  # 2 or 3
    cluster_size: int


@dataclass(frozen=True)
class CheckBudget:
    """What each qemu-img run on one file may spend."""

    cpu_seconds: int  # user + system, enforced by RLIMIT_CPU
    wall_seconds: float  # from the start of the run; waiting for a slot does not count


def check_budget(file_size: int) -> CheckBudget:
    """The budget of qemu-img on a file of file_size bytes: it grows with the file."""
    cpu = CPU_BASE_SECONDS + CPU_SECONDS_PER_GIB * file_size // GIB
    return CheckBudget(cpu, max(TIMEOUT_SECONDS, WALL_PER_CPU_SECOND * cpu))


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a QCOW2 header, in file order; read_qcow2_header returns only safe ones."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0  # version 3 fields, with the values version 2 implies
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    extensions: tuple[int, ...] = ()  # the types of the header extensions

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits


def _refuse(rule: str, reason: str) -> ImageRefused:
    """An ImageRefused for rule whose message carries the contract's prefix."""
    return ImageRefused(PREFIX + reason, rule)


def _human(size: int) -> str:
    """A byte count in binary units, e.g. '2 TiB'."""
    power = min(max(size.bit_length() - 1, 0) // 10, 6)
    number = f"{size / 1024 ** power:.1f}".removesuffix(".0")
    return f"{number} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[power]}"


def _not_qcow2(data: bytes) -> ImageRefused:
    """Refusal for a file without the QCOW2 signature, naming the format when we know it."""
    if not data:
        return _refuse("not_qcow2",
                       "not in QCOW2 format (the file is empty); upload a .qcow2 image")
    for offset, signature, what, advice in _OTHER_FORMATS:
        if data[offset:offset + len(signature)] == signature:
            return _refuse("not_qcow2", f"not in QCOW2 format (it is {what}); {advice}")
    return _refuse("not_qcow2",
                   f"not in QCOW2 format (it does not start with the QCOW2 signature); {_CONVERT}")


def _truncated() -> ImageRefused:
    """Refusal for a header or header extension that runs past the data read."""
    return _refuse("truncated", f"the header is truncated; {_REMAKE}")


def read_qcow2_header(data: bytes, file_size: int, max_virtual_size: int) -> Qcow2Header:
    """Parse and vet a QCOW2 header from the file's first bytes; raise ImageRefused if unsafe."""
    header = _parse_header(data)
    if header.backing_file_offset or header.backing_file_size:
        raise _refuse("backing_file", f"the image has a backing file; {_FLATTEN}")
    header = replace(header, extensions=_read_extensions(data, header))
    _check_features(header)
    _check_size(header.virtual_size, max_virtual_size)
    _check_tables(header, file_size)
    return header


def check_header_start(data: bytes, file_size: int | None, max_virtual_size: int) -> None:
    """Vet an upload by its first HEADER_READ_SIZE bytes, while the rest is still coming.

    The same header reader on the same bytes as inspect_qcow2 reads at the end, so it
    refuses with the same message. file_size is the Content-Length; for a body of unknown
    length (None) no table is held to the end of the file, which only the end can tell.
    """
    size = math.inf if file_size is None else file_size  # every table ends before infinity
    read_qcow2_header(data[:HEADER_READ_SIZE], size, max_virtual_size)


def _parse_header(data: bytes) -> Qcow2Header:
    """The fixed part of the header, refusing what cannot be a QCOW2 header at all."""
    if data[:4] != _MAGIC:
        raise _not_qcow2(data)
    if len(data) < _V2_HEADER.size:
        raise _truncated()
    fields = _V2_HEADER.unpack_from(data)[1:]
    header = Qcow2Header(*fields)
    if header.version not in (2, 3):
        old = " (the old QCOW format)" if header.version == 1 else ""
        raise _refuse("unsupported_version",
                      f"unsupported QCOW2 version {header.version}{old}; {_CONVERT}")
    if not 9 <= header.cluster_bits <= 21:
        raise _refuse("malformed_header",
                      f"invalid cluster size 2^{header.cluster_bits} (QCOW2 allows 2^9 to 2^21);"
                      f" {_REMAKE}")
    if header.version == 2:
        return header
    if len(data) < _V2_HEADER.size + _V3_HEADER.size:
        raise _truncated()
    header = Qcow2Header(*fields, *_V3_HEADER.unpack_from(data, _V2_HEADER.size))
    length = header.header_length
    if not 104 <= length <= header.cluster_size or length % 8:
        raise _refuse("malformed_header", f"invalid header length {length}; {_REMAKE}")
    if len(data) < length:
        raise _truncated()
    return replace(header, compression_type=data[104] if length > 104 else 0)


def _read_extensions(data: bytes, header: Qcow2Header) -> tuple[int, ...]:
    """The types of the header extensions, which lie between the header and cluster 1."""
    found, offset, end = [], header.header_length, min(header.cluster_size, len(data))
    while True:
        if offset + 8 > end:
            raise _truncated()
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == 0:  # end of the extension list
            return tuple(found)
        offset += 8
        if length > end - offset:
            raise _refuse("malformed_header",
                          f"a header extension runs past the first cluster; {_REMAKE}")
        found.append(kind)
        offset += (length + 7) & ~7


def _check_features(header: Qcow2Header) -> None:
    """Refuse external files, encryption, corrupt or dirty images and unknown features."""
    incompatible, extensions = header.incompatible_features, header.extensions
    if _EXT_BACKING_FORMAT in extensions:
        raise _refuse("backing_file", f"the image has a backing file; {_FLATTEN}")
    if (incompatible & _DATA_FILE or _EXT_DATA_FILE in extensions
            or header.autoclear_features & _AUTOCLEAR_DATA_FILE_RAW):
        raise _refuse("data_file", f"the image uses an external data file; {_FLATTEN}")
    if header.crypt_method or _EXT_CRYPTO in extensions:
        kind = {1: "legacy AES", 2: "LUKS"}.get(header.crypt_method, "unknown")
        raise _refuse("encrypted", f"the image is encrypted ({kind} encryption); {_DECRYPT}")
    if incompatible & _CORRUPT:
        raise _refuse("corrupt", f"the image is marked corrupt; {_REPAIR}")
    if incompatible & _DIRTY:
        raise _refuse("dirty", f"the image was not closed cleanly (dirty flag set); {_REPAIR}")
    if incompatible & ~_KNOWN_INCOMPATIBLE:
        raise _refuse("unknown_features",
                      f"the image uses unknown incompatible features (bits "
                      f"{incompatible & ~_KNOWN_INCOMPATIBLE:#x}); convert it with the qemu-img "
                      f"that made it: `qemu-img convert -O qcow2 -o compat=1.1 in.qcow2 out.qcow2`")
    if header.compression_type not in (0, 1) or bool(header.compression_type) != bool(
            incompatible & _COMPRESSION):
        raise _refuse("malformed_header",
                      f"invalid compression type {header.compression_type}; {_REMAKE}")
    if header.refcount_order > 6 or (header.version == 2 and header.refcount_order != 4):
        raise _refuse("malformed_header",
                      f"invalid refcount width 2^{header.refcount_order}; {_REMAKE}")
    if incompatible & _EXTENDED_L2 and header.cluster_bits < 14:
        raise _refuse("malformed_header",
                      f"invalid cluster size for extended L2 entries; {_REMAKE}")


def _check_size(size: int, max_virtual_size: int) -> None:
    """Refuse a virtual size above the limit (never above 1 PiB) or not in whole sectors."""
    limit = min(max_virtual_size, HARD_MAX_VIRTUAL_SIZE)
    if size > limit:
        raise _refuse("virtual_size",
                      f"the virtual size {_human(size)} ({size} bytes) is larger than the limit of "
                      f"{_human(limit)}; make the disk smaller (shrink its partitions, then "
                      f"`qemu-img resize --shrink in.qcow2 SIZE`)")
    if size % 512:
        raise _refuse("malformed_header",
                      f"the virtual size {size} is not a multiple of 512 bytes; {_REMAKE}")


def _check_tables(header: Qcow2Header, file_size: int) -> None:
    """Refuse L1, refcount and snapshot tables of absurd size or outside the file."""
    cluster, l1_size = header.cluster_size, header.l1_size
    covered = cluster * (cluster // (16 if header.incompatible_features & _EXTENDED_L2 else 8))
    if not -(-header.virtual_size // covered) <= l1_size <= _MAX_L1_BYTES // 8:
        raise _refuse("malformed_tables", f"invalid L1 table size {l1_size}; {_REMAKE}")
    _check_table("L1 table", header.l1_table_offset, l1_size * 8, cluster, file_size)
    clusters = header.refcount_table_clusters
    if not 1 <= clusters <= _MAX_REFTABLE_BYTES // cluster:
        raise _refuse("malformed_tables", f"invalid refcount table size {clusters}; {_REMAKE}")
    _check_table("refcount table", header.refcount_table_offset, clusters * cluster, cluster,
                  file_size)
    if header.nb_snapshots > _MAX_SNAPSHOTS:
        raise _refuse("malformed_tables",
                      f"invalid snapshot table ({header.nb_snapshots} snapshots); {_REMAKE}")
    _check_table("snapshot table", header.snapshots_offset, header.nb_snapshots * 40, cluster,
                 file_size)


def _check_table(name: str, offset: int, length: int, cluster: int, file_size: int) -> None:
    """Refuse a metadata table that is misaligned, overlaps the header or ends past the file."""
    if length and (offset % cluster or offset == 0 or offset + length > file_size):
        raise _refuse("malformed_tables",
                      f"invalid {name} (misaligned or past the end of the file); {_REMAKE}")


def _limit_resources(cpu_seconds: int, parent: int) -> None:
    """Cap qemu-img's CPU time, memory and output (CVE-2015-5162); runs just before exec."""
    # The soft CPU limit sends SIGXCPU, which tells a spent budget from other deaths; the
    # hard one, a second later, SIGKILLs a qemu-img that ignored it.
    for kind, soft, wanted in ((resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
                               (resource.RLIMIT_AS, MEMORY_BYTES, MEMORY_BYTES),
                               (resource.RLIMIT_FSIZE, OUTPUT_BYTES, OUTPUT_BYTES),
                               (resource.RLIMIT_CORE, 0, 0)):
        hard = resource.getrlimit(kind)[1]  # never ask for more than we are allowed
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(kind, (min(soft, limit), limit))
    # Die with the worker: a killed worker's slot is free at once, so its qemu-img must not
    # run on outside the bound.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _dotted(version: tuple[int, ...]) -> str:
    """A version tuple as text, e.g. '7.2'."""
    return ".".join(map(str, version))


def _qemu_img_path() -> str:
    """The qemu-img executable; RuntimeError when it is not installed."""
    path = shutil.which(QEMU_IMG)
    if path is None:
        raise RuntimeError(f"{QEMU_IMG} not found on PATH: install qemu-utils (Debian/Ubuntu) "
                           f"or qemu-img (Fedora/RHEL), version {_dotted(MIN_QEMU_IMG_VERSION)}+")
    return path


def _run_qemu_img(*args: str, budget: CheckBudget | None = None
                  ) -> subprocess.CompletedProcess[bytes]:
    """Run qemu-img without a shell, under limits and a timeout; refuse when it is stopped."""
    budget = budget or check_budget(0)
    # stdout goes to a file so that RLIMIT_FSIZE bounds what we read back into memory;
    # stderr (one line per bad cluster, unbounded) is never read, so never shown to users.
    # preexec_fn is safe enough in a threaded server here: it only calls get/setrlimit and
    # prctl, which take no locks between fork and exec.
    limits = functools.partial(_limit_resources, budget.cpu_seconds, os.getpid())
    with tempfile.TemporaryFile() as out:
        try:
            done = subprocess.run(
                [_qemu_img_path(), *args], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.DEVNULL, env=_ENV, timeout=budget.wall_seconds,
                preexec_fn=limits, check=False)
        except subprocess.TimeoutExpired:
            raise _refuse("qemu_img_limits",
                          f"qemu-img took longer than {budget.wall_seconds:g} s to read it; "
                          f"{_CONVERT} to rebuild its metadata") from None
        if done.returncode == -signal.SIGXCPU:
            raise _over_budget(budget)
        if done.returncode < 0:  # killed by a signal: a memory or output limit
            raise _refuse("qemu_img_limits",
                          f"qemu-img ran out of its CPU, memory or output allowance reading it; "
                          f"{_CONVERT}")
        out.seek(0)
        done.stdout = out.read(OUTPUT_BYTES)
    return done


def _over_budget(budget: CheckBudget) -> ImageRefused:
    """Refusal for an image whose metadata costs more CPU than a file of its size may."""
    return _refuse(
        "qemu_img_limits",
        f"checking it needs more CPU time than the {budget.cpu_seconds} s allowed for a file of "
        f"its size ({CPU_BASE_SECONDS} s plus {CPU_SECONDS_PER_GIB} s per GiB): its metadata "
        f"makes far more work than its size accounts for; {_CONVERT} to rebuild it")


def _image_spec(path: str) -> str:
    """A json: filename that opens only path itself: qcow2, read-only, backing file disabled."""
    return "json:" + json.dumps({
        "driver": "qcow2", "read-only": True, "backing": None,
        "file": {"driver": "file", "filename": os.path.abspath(path)}})


def _json_report(done: subprocess.CompletedProcess[bytes]) -> dict:
    """qemu-img's JSON output, or {} when there is none."""
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _check_info(info: dict, header: Qcow2Header) -> None:
    """Refuse when qemu-img info sees another file, encryption, damage or another geometry."""
    specific = (info.get("format-specific") or {}).get("data") or {}
    if any(key in info for key in ("backing-filename", "full-backing-filename")):
        raise _refuse("backing_file", f"the image has a backing file; {_FLATTEN}")
    if "data-file" in specific or specific.get("data-file-raw"):
        raise _refuse("data_file", f"the image uses an external data file; {_FLATTEN}")
    if info.get("encrypted") or "encrypt" in specific:
        raise _refuse("encrypted", f"the image is encrypted; {_DECRYPT}")
    if specific.get("corrupt"):
        raise _refuse("corrupt", f"the image is marked corrupt; {_REPAIR}")
    if info.get("dirty-flag"):
        raise _refuse("dirty", f"the image was not closed cleanly (dirty flag set); {_REPAIR}")
    seen = (info.get("format"), info.get("virtual-size"), info.get("cluster-size"),
            {"0.10": 2, "1.1": 3}.get(specific.get("compat")))
    if seen != ("qcow2", header.virtual_size, header.cluster_size, header.version):
        raise _refuse("qemu_img_mismatch",
                      f"qemu-img info disagrees with the image header; {_REMAKE}")


def _check_consistency(done: subprocess.CompletedProcess[bytes]) -> None:
    """Refuse unless qemu-img check found nothing worse than leaked clusters (exit 3)."""
    report = _json_report(done)
    if done.returncode == 2 or report.get("corruptions"):
        raise _refuse("corrupt",
                      f"qemu-img check found {report.get('corruptions', 'some')} corruptions; "
                      f"{_REPAIR}")
    if done.returncode not in (0, 3) or report.get("check-errors"):
        raise _refuse("check_failed", f"qemu-img check could not finish checking it; {_REMAKE}")


def _open_lock(folder: str, name: str) -> int:
    """A file descriptor of its own on one lock file in folder (made if missing)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(os.path.join(folder, name), flags, 0o600)


def _try_lock(fd: int) -> bool:
    """Take the flock on fd if nobody holds it; never wait."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock_and_close(fd: int) -> None:
    """Drop fd's lock (if it holds one) and close it.

    The unlock matters: a child forked by another thread holds a copy of fd until it execs,
    and closing alone would leave the lock held for that long.
    """
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _wait_for_slot(folder: str, fds: list[int]) -> int:
    """Lock one of fds, waiting while all are held; return its index.

    flock cannot wait for "any of these", so waiters queue on one more lock, the gate, and
    only the first in line looks at the slots, every SLOT_POLL_SECONDS.
    """
    gate = _open_lock(folder, "queue")
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        while True:
            for index, fd in enumerate(fds):
                if _try_lock(fd):
                    return index
            time.sleep(SLOT_POLL_SECONDS)
    finally:
        _unlock_and_close(gate)


@contextlib.contextmanager
def check_slot(folder: str, slots: int) -> Iterator[int]:
    """Hold one of `slots` lock files in folder for the block; yield its index.

    flock locks belong to an open file, so they exclude the threads of one worker, the
    workers of one server and the servers of one machine alike, and the kernel drops them
    when their holder exits or is killed.
    """
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fds = [_open_lock(folder, f"slot-{index}") for index in range(slots)]
    try:
        yield _wait_for_slot(folder, fds)
    finally:
        for fd in fds:
            _unlock_and_close(fd)


def inspect_qcow2(path: str, max_virtual_size: int,
                  slots: tuple[str, int] | None = None) -> ImageInfo:
    """Vet the file at path: header, then qemu-img info and check; ImageRefused if unsafe.

    qemu-img runs under a budget that grows with the file's size, and, given slots (a
    folder and a count), in one of that many check slots, waiting while all are taken.
    """
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        data = file.read(HEADER_READ_SIZE)
    header = read_qcow2_header(data, file_size, max_virtual_size)
    spec, budget = _image_spec(path), check_budget(file_size)
    with check_slot(*slots) if slots else contextlib.nullcontext():
        # info first: it reports a backing or data file without opening it; check would.
        done = _run_qemu_img("info", "-f", "qcow2", "--output=json", spec, budget=budget)
        if done.returncode != 0:
            raise _refuse("qemu_img_open",
                          f"qemu-img cannot open it (see `qemu-img info in.qcow2`); {_REMAKE}")
        _check_info(_json_report(done), header)
        _check_consistency(
            _run_qemu_img("check", "-f", "qcow2", "--output=json", spec, budget=budget))
    return ImageInfo(header.virtual_size, header.version, header.cluster_size)


def qemu_img_version() -> tuple[int, int, int]:
    """The installed qemu-img's version, e.g. (7, 2, 22); RuntimeError if unknown."""
    try:
        done = subprocess.run([_qemu_img_path(), "--version"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=_ENV,
                              timeout=TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run {QEMU_IMG} --version: {exc}") from exc
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", done.stdout)
    if match is None:
        raise RuntimeError(f"cannot tell the version of {QEMU_IMG} from {done.stdout[:80]!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def require_qemu_img() -> None:
    """Raise RuntimeError unless a recent enough qemu-img is installed; call it at startup."""
    version = qemu_img_version()
    if version < MIN_QEMU_IMG_VERSION:
        raise RuntimeError(
            f"{QEMU_IMG} {_dotted(version)} is too old: imagestore needs "
            f"{_dotted(MIN_QEMU_IMG_VERSION)} or later (see docs/security.md)")
