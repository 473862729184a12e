"""`imagestore prune`: the pull cache loses the files that no pull or read has used for an
age, each under its image's lock, and nothing else. The rules called in process on a real
folder (and real flock locks); then the command after real pulls from a real gunicorn."""

import os
import sys
import time
from pathlib import Path

import pytest
from client_fixtures import CLIENT

sys.path.insert(0, str(CLIENT))

from imagestore_client.cache import Cache, _remove_if_unused, prune

DAY = 86400
OLD, NEW, PARTIAL = "a" * 64, "b" * 64, "c" * 64


def put(path, size, days_ago):
    """A file of size bytes last read and written days_ago days ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    moment = time.time() - days_ago * DAY
    os.utime(path, (moment, moment))
    return path


@pytest.fixture
def cache(tmp_path):
    """A cache holding an old and a recent checked file, an old partial download, and an
    old file of a name that is not the cache's."""
    cache = Cache(tmp_path / "cache")
    put(cache.path(OLD), 1000, 40)
    put(cache.path(NEW), 2000, 2)
    put(cache.partial(PARTIAL), 300, 40)
    put(cache.root / "sha256" / "notes.txt", 10, 40)
    return cache


def names(paths):
    return sorted(Path(path).name for path in paths)


def test_prune_removes_what_was_not_used_for_the_age_and_keeps_the_rest(cache):
    pruned = prune(cache, 30 * DAY)
    assert names(pruned.removed) == [f"{OLD}.qcow2", f"{PARTIAL}.part"]
    assert (pruned.size, pruned.busy) == (1300, [])
    assert not cache.path(OLD).exists() and not cache.partial(PARTIAL).exists()
    assert cache.path(NEW).exists()
    assert (cache.root / "sha256" / "notes.txt").exists()  # not a file the cache made


def test_a_dry_run_names_the_same_files_and_changes_nothing(cache):
    dry = prune(cache, 30 * DAY, dry_run=True)
    assert names(dry.removed) == [f"{OLD}.qcow2", f"{PARTIAL}.part"]
    assert cache.path(OLD).exists() and cache.partial(PARTIAL).exists()
    assert not (cache.root / "locks").exists()  # not even a lock file


def test_a_file_whose_lock_a_pull_holds_is_left_for_the_next_prune(cache):
    with cache.locked(OLD):  # a pull of that image, running now
        pruned = prune(cache, 30 * DAY)
    assert names(pruned.removed) == [f"{PARTIAL}.part"]
    assert names(pruned.busy) == [f"{OLD}.qcow2"]
    assert cache.path(OLD).exists()
    assert names(prune(cache, 30 * DAY).removed) == [f"{OLD}.qcow2"]


def test_a_file_used_after_it_was_listed_is_kept(cache):
    before = time.time() - 30 * DAY
    cache.mark_used(OLD)  # a pull between prune's listing and its lock
    assert _remove_if_unused(cache, OLD, cache.path(OLD), before) == "used"
    assert cache.path(OLD).exists()


def test_marking_a_file_used_moves_its_access_time_alone(cache):
    written = cache.path(OLD).stat().st_mtime_ns
    cache.mark_used(OLD)
    stat = cache.path(OLD).stat()
    assert stat.st_mtime_ns == written
    assert stat.st_atime > time.time() - 60


def backdate(path, days):
    moment = time.time() - days * DAY
    os.utime(path, (moment, moment))


def test_the_command_prunes_after_real_pulls_and_a_pull_marks_its_file(imagestore, proxy,
                                                                       pulled_image):
    _, data = pulled_image
    path = Path(imagestore("pull", "pulled").stdout.strip())
    backdate(path, 40)
    again = imagestore("pull", "pulled")  # a 304: no byte of the file read
    assert again.returncode == 0, again.stderr
    kept = imagestore("prune", IMAGESTORE_URL=None)  # needs no server
    assert (kept.returncode, kept.stdout) == (0, "")
    assert kept.stderr == "imagestore: removed 0 files (0 B) not used for 30d\n"
    assert path.exists()

    backdate(path, 40)
    dry = imagestore("prune", "--dry-run", "--older-than", "39d")
    assert (dry.returncode, dry.stdout) == (0, f"{path}\n")
    assert dry.stderr.startswith("imagestore: would remove 1 file (")
    assert path.exists()
    done = imagestore("prune", "--older-than", "720h")
    assert (done.returncode, done.stdout) == (0, f"{path}\n")
    assert not path.exists()
    pulled = imagestore("pull", "pulled")  # the same path again, downloaded anew
    assert (pulled.stdout.strip(), Path(pulled.stdout.strip()).read_bytes()) == (str(path), data)


def test_a_bad_age_is_a_usage_error(imagestore):
    bad = imagestore("prune", "--older-than", "a month")
    assert bad.returncode == 2
    assert "not an age: 'a month' (e.g. 30d, 12h)" in bad.stderr
