"""An upload's whole blocks are written with direct I/O (around the page cache), and
everything else (a last piece, an odd offset, a buffer that is not aligned) still lands on
disk exactly."""

import fcntl
import hashlib
import os

import pytest

import uploads
from directio import BLOCK, DirectWrites, aligned_buffer


def file_system_of(path):
    """The type of the file system that holds path, from /proc/self/mountinfo."""
    best, kind = "", None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point, fs_type = fields[4], fields[fields.index("-") + 1]
            inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fs_type
    return kind


@pytest.fixture
def on_disk(tmp_path):
    """tmp_path, which must be on a disk's file system: in tmpfs every file is page cache."""
    if file_system_of(tmp_path) == "tmpfs":
        pytest.skip("the temporary folder is in tmpfs, where no file bypasses the page cache")
    return tmp_path


def direct_flag(out):
    return bool(fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & os.O_DIRECT)


class Pieces:
    """A body with a readinto that gives data in odd pieces."""

    def __init__(self, data):
        self.data, self.position = data, 0

    def readinto(self, view):
        got = min(len(view), 300_001, len(self.data) - self.position)
        view[:got] = self.data[self.position:self.position + got]
        self.position += got
        return got


class WatchedPieces(Pieces):
    """Pieces that note, at each read, whether the file being written has O_DIRECT on."""

    def __init__(self, data, out):
        super().__init__(data)
        self.out, self.direct_at_reads = out, []

    def readinto(self, view):
        self.direct_at_reads.append(direct_flag(self.out))
        return super().readinto(view)


def test_an_upload_writes_its_whole_buffers_directly(on_disk):
    """All through the body the file has O_DIRECT on (the buffers go around the page cache);
    at the end it is off again, and the file and the hash are the body's."""
    data = os.urandom(3 * uploads.CHUNK_SIZE + 5000)
    path = on_disk / "staged"
    with open(path, "xb", buffering=0) as out:
        body = WatchedPieces(data, out)
        size, digest = uploads.receive_body(body, out, max_size=len(data))
        assert not direct_flag(out)  # left as it was found, for the fsync and anyone after
    assert all(body.direct_at_reads) and len(body.direct_at_reads) > 10
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data


def test_direct_io_stays_on_for_whole_blocks_and_ends_with_the_first_short_piece(on_disk):
    with open(on_disk / "f", "xb", buffering=0) as out:
        direct = DirectWrites(out)
        assert direct.on and direct_flag(out)
        block = aligned_buffer(2 * BLOCK)
        block[:] = b"a" * (2 * BLOCK)
        assert len(direct.write_blocks(memoryview(block))) == 0
        assert direct.on
        tail = aligned_buffer(BLOCK)
        tail[:] = b"b" * BLOCK
        rest = direct.write_blocks(memoryview(tail)[:100])
        assert len(rest) == 100 and not direct.on and not direct_flag(out)
        uploads.write_or_507(out, rest, direct)
    assert (on_disk / "f").read_bytes() == b"a" * (2 * BLOCK) + b"b" * 100


def test_a_piece_at_an_odd_offset_is_written_the_ordinary_way(on_disk):
    """A tus piece goes on at its upload's offset, which need not be a whole block."""
    path = on_disk / "upload"
    path.write_bytes(b"12345")
    data = os.urandom(2 * uploads.CHUNK_SIZE)
    with open(path, "r+b", buffering=0) as out:
        out.seek(5)
        assert not DirectWrites(out).on
        out.seek(5)
        assert uploads.receive_body(Pieces(data), out, max_size=len(data))[0] == len(data)
    assert path.read_bytes() == b"12345" + data


def test_a_buffer_that_is_not_aligned_falls_back_to_the_page_cache(on_disk):
    """The kernel refuses a direct write from an odd address (EINVAL): the bytes are written
    the ordinary way instead, none lost."""
    data = os.urandom(2 * BLOCK + 1)
    with open(on_disk / "f", "xb", buffering=0) as out:
        direct = DirectWrites(out)
        odd = memoryview(bytearray(data))[1:]  # one byte past wherever the bytearray starts
        uploads.write_or_507(out, odd, direct)
        assert not direct.on
    assert (on_disk / "f").read_bytes() == data[1:]
