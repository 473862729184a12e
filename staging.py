"""The local folder that every backend keeps: uploads staged there, and the intent journal.

An upload is written into a staged file (it must be inspected on disk before it is
stored), and a key whose file and row are being changed together carries an intent
until the row is committed. Both live as files in one private folder, whose names start
with the writing process's pid, so that the next process can tell what a killed worker
left behind. Backends use a StagingArea and an IntentJournal; they are not one.
"""

import contextlib
import errno
import os
import secrets

from storage import StorageUnavailable

TEMP_SUFFIX = ".part"
# An intent marks a key whose file and row are being changed together, from just before
# the file moves until the row is committed: a process killed in between leaves it behind.
INTENT_SUFFIX = ".intent"
# What a local folder answers when the filesystem under it is read-only or refuses us:
# the store is down, not the request wrong.
FOLDER_DOWN_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def folder_down_is_unavailable(folder, name, access="writable"):
    """Turn an OSError from the block into StorageUnavailable when it means that the folder
    is down (read-only, refused, or gone altogether); any other error passes unchanged.

    A missing folder is not made again: it is most often a mount that is gone, and files
    written into the empty mount point would be lost when it comes back.
    """
    try:
        yield
    except StorageUnavailable:
        raise
    except OSError as error:
        if error.errno in FOLDER_DOWN_ERRNOS:
            reason = f"{name} is not {access}"
        elif error.errno == errno.ENOENT and not os.path.isdir(folder):
            reason = f"{name} is missing"
        else:
            raise
        raise StorageUnavailable(f"{reason}: {error}", reason=reason) from error


def free_bytes(path):
    """Bytes free for an unprivileged writer on the filesystem that holds path."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fsync_dir(path):
    """Make a rename or unlink in path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staged:
    """A temporary file that an upload is written into; removed unless moved away."""

    def __init__(self, folder):
        # The pid in the name lets a sweep tell a dead worker's leftovers from live uploads.
        name = f"{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"
        self.path = os.path.join(folder, name)
        self.file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed by discard()

    def discard(self):
        """Close and remove the file, if it is still there."""
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _pid_alive(pid):
    """Whether a process with this pid runs; a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to asking the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def _owner_alive(name):
    """Whether the process named by the pid in front of a temporary file's name still runs.

    Our own pid counts as dead: sweeps run before this process stages anything, so a file
    with our pid was left by an earlier process that had it (containers reuse pids).
    """
    pid = name.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    return _pid_alive(int(pid))


def sweep_temp_folder(folder):
    """Remove temporary files whose writing process is gone; return how many.

    Intents are left alone: only the caller, which knows the database, can settle them.
    """
    removed = 0
    for name in os.listdir(folder):
        ours = name.split("-", 1)[0].isdigit()
        if ours and (name.endswith(INTENT_SUFFIX) or
                     (name.endswith(TEMP_SUFFIX) and _owner_alive(name))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


class StagingArea:
    """A private local folder that uploads are staged in.

    name is how errors call the folder when it is down ("the image store (file storage)"):
    a client is told which store failed, never its path.
    """

    def __init__(self, folder, name):
        self.folder = os.path.abspath(folder)
        self.name = name
        os.makedirs(self.folder, mode=0o700, exist_ok=True)

    def folder_down(self):
        """A block in which an OSError meaning that the folder is down is StorageUnavailable."""
        return folder_down_is_unavailable(self.folder, self.name)

    def free_space(self):
        """Bytes free on the disk that uploads are staged on."""
        with self.folder_down():
            return free_bytes(self.folder)

    @contextlib.contextmanager
    def staging(self):
        """Yield a Staged file; whatever happens, nothing of it is left unless put() took it."""
        with self.folder_down():
            staged = Staged(self.folder)
        try:
            yield staged
        finally:
            with self.folder_down():  # a store turned read-only meanwhile
                staged.discard()

    def check_writable(self):
        """Raise OSError when no upload can be staged."""
        with self.staging() as staged:
            staged.file.write(b"ok")

    def sweep(self):
        """Remove what killed workers left staged (intents stay); return how many."""
        return sweep_temp_folder(self.folder)


class IntentJournal:
    """Intents as empty files in a local folder (the staging folder), one per key and pid.

    Every backend moves a file in before its row is committed and removes it after its
    row is deleted; a process killed in between leaves an intent, which recovery.recover()
    settles when the next process starts. A backend's put() calls intend(key) before the
    file becomes visible under key.
    """

    def __init__(self, folder, name):
        self.folder = os.path.abspath(folder)
        self.name = name

    def _path(self, key, pid=None):
        return os.path.join(self.folder, f"{pid or os.getpid()}-{key}{INTENT_SUFFIX}")

    def intend(self, key):
        """Durably note that this process is about to change key's file and row together."""
        with folder_down_is_unavailable(self.folder, self.name):
            os.close(os.open(self._path(key), os.O_WRONLY | os.O_CREAT, 0o600))
            fsync_dir(self.folder)

    def settle(self, key, pid=None):
        """Drop the intent on key, once file and row agree again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key, pid))

    def intended_keys(self):
        """Keys with an intent of any process, live or dead: files that may be about to
        get (or lose) their row, and that nothing but recover() may remove."""
        return {name[:-len(INTENT_SUFFIX)].partition("-")[2]
                for name in os.listdir(self.folder) if name.endswith(INTENT_SUFFIX)}

    def unsettled(self):
        """(key, pid) of the intents whose process died before settling them."""
        found = []
        for name in os.listdir(self.folder):
            pid, _, key = name[:-len(INTENT_SUFFIX)].partition("-")
            if name.endswith(INTENT_SUFFIX) and pid.isdigit() and not _owner_alive(name):
                found.append((key, int(pid)))
        return found
