"""Where image files live, behind a small interface.

Every backend stages an upload in a local temporary file (it must be inspected
on disk first), then `put` moves it in under a new key; `open`, `delete`,
`keys` and `download_url` work on keys. LocalStorage keeps files in a folder,
S3Storage in any S3-compatible bucket; storage_from_url picks one by the URL's
scheme, and nothing else in the code knows which one it has.
"""

import contextlib
import errno
import os
import secrets
import time
from urllib.parse import urlparse

TEMP_SUFFIX = ".part"
# An intent marks a key whose file and row are being changed together, from just before
# the file moves until the row is committed: a process killed in between leaves it behind.
INTENT_SUFFIX = ".intent"
OBJECT_SUFFIX = ".qcow2"
MiB = 1 << 20
# What a local folder answers when the filesystem under it is read-only or refuses us:
# the store is down, not the request wrong.
FOLDER_DOWN_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class StorageUnavailable(OSError):
    """The store could not be reached or refused the request (not a missing file).

    reason, when given, is a short text fit for clients: it names the store, not its path.
    """

    def __init__(self, message, *, reason=None):
        super().__init__(message)
        self.reason = reason


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


class TempFolder:
    """What every backend keeps in its private local folder (self.temp_folder): staged
    uploads, and intents.

    Every backend moves a file in before its row is committed and removes it after its
    row is deleted; a process killed in between leaves an intent, which images.recover()
    settles when the next process starts. put() should call intend(key) before the file
    becomes visible under key.
    """

    # How errors and /healthz name the disk under temp_folder (a subclass may say better).
    FOLDER_NAME = "the upload staging folder"
    DISK_NAME = "staging"

    def _temp_folder_down(self):
        return folder_down_is_unavailable(self.temp_folder, self.FOLDER_NAME)

    def free_space(self):
        """Bytes free on the disk that uploads are staged on."""
        with self._temp_folder_down():
            return free_bytes(self.temp_folder)

    @contextlib.contextmanager
    def staging(self):
        """Yield a Staged file; whatever happens, nothing of it is left unless put() took it."""
        with self._temp_folder_down():
            staged = Staged(self.temp_folder)
        try:
            yield staged
        finally:
            with self._temp_folder_down():  # a store turned read-only meanwhile
                staged.discard()

    def check_temp_writable(self):
        """Raise OSError when no upload can be staged."""
        with self.staging() as staged:
            staged.file.write(b"ok")

    def _intent_path(self, key, pid=None):
        return os.path.join(self.temp_folder, f"{pid or os.getpid()}-{key}{INTENT_SUFFIX}")

    def intend(self, key):
        """Durably note that this process is about to change key's file and row together."""
        with self._temp_folder_down():
            os.close(os.open(self._intent_path(key), os.O_WRONLY | os.O_CREAT, 0o600))
            fsync_dir(self.temp_folder)

    def settle(self, key, pid=None):
        """Drop the intent on key, once file and row agree again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._intent_path(key, pid))

    def intended_keys(self):
        """Keys with an intent of any process, live or dead: files that may be about to
        get (or lose) their row, and that nothing but recover() may remove."""
        return {name[:-len(INTENT_SUFFIX)].partition("-")[2]
                for name in os.listdir(self.temp_folder) if name.endswith(INTENT_SUFFIX)}

    def unsettled(self):
        """(key, pid) of the intents whose process died before settling them."""
        found = []
        for name in os.listdir(self.temp_folder):
            pid, _, key = name[:-len(INTENT_SUFFIX)].partition("-")
            if name.endswith(INTENT_SUFFIX) and pid.isdigit() and not _owner_alive(name):
                found.append((key, int(pid)))
        return found


class LocalStorage(TempFolder):
    """Image files in a folder, with a private temporary folder beside them."""

    FOLDER_NAME = "the image store (file storage)"
    DISK_NAME = "storage"

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.temp_folder = os.path.join(self.root, ".incoming")
        os.makedirs(self.root, exist_ok=True)
        # Private, and on the same filesystem as the store, so put() is one rename.
        os.makedirs(self.temp_folder, mode=0o700, exist_ok=True)

    def put(self, staged):
        """Move a staged file into the store durably; return its new key.

        The key is left with an intent of this process, which the caller settles once the
        row is committed (or the file removed again).
        """
        key = secrets.token_hex(16)
        self.intend(key)
        try:
            with self._root_down():
                os.fsync(staged.file.fileno())
                staged.file.close()
                os.rename(staged.path, self.local_path(key))
                fsync_dir(self.root)
        except BaseException:
            self.delete(key)
            self.settle(key)
            raise
        return key

    def _root_down(self, access="writable"):
        return folder_down_is_unavailable(self.root, self.FOLDER_NAME, access)

    def local_path(self, key):
        """The file behind key, for sendfile."""
        return os.path.join(self.root, key + OBJECT_SUFFIX)

    def open(self, key):
        """Open the stored file for reading (a real file: downloads go out by sendfile).

        FileNotFoundError when this one file is gone (a racing delete); StorageUnavailable
        when the whole folder is.
        """
        with self._root_down("readable"):
            return open(self.local_path(key), "rb")

    def download_url(self, key, filename, mimetype, expires=600):
        """None: local files are served by this app itself."""
        return None

    def delete(self, key):
        """Remove a stored file; one already gone is no error, a store that is gone is."""
        with contextlib.suppress(FileNotFoundError), self._root_down():
            os.unlink(self.local_path(key))

    def keys(self, older_than=0):
        """Keys of the stored files last changed more than older_than seconds ago."""
        limit = time.time() - older_than
        with os.scandir(self.root) as entries:
            return [e.name.removesuffix(OBJECT_SUFFIX) for e in entries
                    if e.name.endswith(OBJECT_SUFFIX) and e.stat().st_mtime <= limit]

    def sweep(self):
        """Remove what killed workers left in the temporary folder, but for intents."""
        return sweep_temp_folder(self.temp_folder)

    def check_writable(self):
        """Raise OSError when the store cannot take a new file."""
        self.check_temp_writable()


def storage_from_url(url, staging_dir=None, redirect_downloads=True):
    """Pick the backend by the URL's scheme: file:///folder or s3://bucket/prefix."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme == "s3":
        from s3storage import S3Storage  # boto3 is loaded only where it is used

        if not parsed.netloc:
            raise ValueError("STORAGE_URL s3:// needs a bucket: s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path, staging_dir, redirect_downloads)
    raise ValueError(f"unsupported STORAGE_URL scheme {parsed.scheme!r} (use file:// or s3://)")
