"""receive_body: the bytes land on disk and hash right while the hash runs on its own thread
and writeback starts on the way, and no thread is left behind when a body fails."""

import hashlib
import io
import os
import threading

import pytest

import uploads
from errors import ApiError


class Body(io.RawIOBase):
    """A request body that gives `data` in uneven pieces, then optionally fails."""

    def __init__(self, data, fail_at=None):
        self.data, self.position, self.fail_at = data, 0, fail_at

    def read(self, size=-1):
        if self.fail_at is not None and self.position >= self.fail_at:
            raise OSError("connection reset")
        piece = self.data[self.position:self.position + min(size, 300_001)]
        self.position += len(piece)
        return piece


@pytest.fixture
def small_steps(monkeypatch):
    """Small chunks and writeback steps, so a small body goes through every branch."""
    monkeypatch.setattr(uploads, "CHUNK_SIZE", 64 * 1024)
    monkeypatch.setattr(uploads, "WRITEBACK_STEP", 256 * 1024)


def hash_threads():
    return [t for t in threading.enumerate() if t.name == "upload-sha256"]


def test_body_is_written_and_hashed_exactly(tmp_path, small_steps):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    path = tmp_path / "staged"
    with open(path, "xb", buffering=0) as out:
        size, digest = uploads.receive_body(Body(data), out, max_size=len(data))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data
    assert hash_threads() == []


@pytest.mark.parametrize("body, status", [
    (Body(b"x" * 2_000_000), 413),                   # longer than the limit
    (Body(b"x" * 2_000_000, fail_at=900_000), 400),  # the client goes away
])
def test_failed_body_leaves_no_hash_thread(tmp_path, small_steps, body, status):
    with open(tmp_path / "staged", "xb", buffering=0) as out, \
            pytest.raises(ApiError) as error:
        uploads.receive_body(body, out, max_size=1_500_000)
    assert error.value.status == status
    assert hash_threads() == []
