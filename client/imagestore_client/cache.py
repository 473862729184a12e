"""The pull cache's folder: checked files, partial downloads, one lock an image, and
pruning the files that have not been used for a while.

    CACHE/sha256/<hex>.qcow2   checked files, read-only, never changed
    CACHE/partial/<hex>.part   downloads not finished
    CACHE/locks/<hex>.lock     one lock file an image (flock), never removed

A file's last use is its access time or, if later, its modification time (a download's
end): a pull that finds it cached sets its access time (the kernel's relatime also moves
it, at most daily, while a VM reads the file), so a mount with noatime still counts every
pull.
"""

import contextlib
import fcntl
import os
import re
import sys
import time
from dataclasses import dataclass

HEX = re.compile(r"[0-9a-f]{64}")


class Cache:
    """The cache folder: finished files, partial downloads, lock files."""

    def __init__(self, root):
        self.root = root

    def path(self, sha256):
        return self.root / "sha256" / f"{sha256}.qcow2"

    def partial(self, sha256):
        return self.root / "partial" / f"{sha256}.part"

    def _lock_file(self, sha256):
        path = self.root / "locks" / f"{sha256}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")  # closed by the caller's with

    @contextlib.contextmanager
    def locked(self, sha256):
        """Hold this image's lock for the block, waiting (and saying so) while another
        process holds it."""
        with self._lock_file(sha256) as lock:
            if not _lock_now(lock):
                print(f"imagestore: waiting for another pull of {sha256[:12]}…", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # the lock goes with the file's close

    @contextlib.contextmanager
    def locked_if_free(self, sha256):
        """Hold this image's lock for the block if no other process holds it; yields
        whether it does."""
        with self._lock_file(sha256) as lock:
            yield _lock_now(lock)

    def mark_used(self, sha256):
        """Set the file's access time to now (its modification time kept): its last use.
        In a cache shared by several users only the file's owner may; the kernel's relatime
        then stands in."""
        path = self.path(sha256)
        with contextlib.suppress(PermissionError):
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def _lock_now(lock):
    """Take the lock file's flock if nobody holds it; whether that was done."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass(frozen=True)
class Pruned:
    """What prune found: the files it removed (or would), their bytes, the old files it
    left because a pull holds their lock."""

    removed: list
    size: int
    busy: list


def last_use(stat):
    """When a cache file was last used: read (access time) or written, the later."""
    return max(stat.st_atime, stat.st_mtime)


def _old_files(cache, before):
    """(sha256, path, size) of the checked and partial files last used before `before`;
    files of other names are not the cache's and are left alone."""
    for folder, suffix in (("sha256", ".qcow2"), ("partial", ".part")):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(cache.root / folder):
                sha256 = entry.name.removesuffix(suffix)
                if entry.name.endswith(suffix) and HEX.fullmatch(sha256) and entry.is_file(
                        follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    if last_use(stat) < before:
                        yield sha256, cache.root / folder / entry.name, stat.st_size


def _remove_if_unused(cache, sha256, path, before):
    """Remove path under its image's lock if it is still unused since before: "removed",
    "busy" (a pull holds the lock) or "used" (used since it was listed, or gone)."""
    with cache.locked_if_free(sha256) as free:
        if not free:
            return "busy"
        try:  # looked at again under the lock: a pull may have used it since
            if last_use(path.stat()) >= before:
                return "used"
            path.unlink()
        except FileNotFoundError:
            return "used"
    return "removed"


def prune(cache, age, dry_run=False, now=None):
    """Remove the cache's files not used for `age` seconds, each under its image's lock
    (one that a pull holds is left for the next prune); dry_run: only say which, and
    change nothing (no lock taken)."""
    before = (time.time() if now is None else now) - age
    removed, size, busy = [], 0, []
    for sha256, path, length in _old_files(cache, before):
        outcome = "removed" if dry_run else _remove_if_unused(cache, sha256, path, before)
        if outcome == "removed":
            removed.append(path)
            size += length
        elif outcome == "busy":
            busy.append(path)
    return Pruned(removed, size, busy)
