"""Where image files live, behind a small interface.

Every backend stages an upload in a local temporary file (it must be inspected
on disk first), then `put` moves it in under a new key; `open`, `local_path`,
`delete` and `keys` work on keys. A second backend is a new class here.
"""

import contextlib
import os
import secrets
import time
from urllib.parse import urlparse

TEMP_SUFFIX = ".part"


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


def sweep_temp_folder(folder):
    """Remove temporary files whose writing process is gone; return how many."""
    removed = 0
    for name in os.listdir(folder):
        pid = name.split("-", 1)[0]
        if name.endswith(TEMP_SUFFIX) and pid.isdigit() and _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


class LocalStorage:
    """Image files in a folder, with a private temporary folder beside them."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.temp_folder = os.path.join(self.root, ".incoming")
        os.makedirs(self.root, exist_ok=True)
        # Private, and on the same filesystem as the store, so put() is one rename.
        os.makedirs(self.temp_folder, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def staging(self):
        """Yield a Staged file; whatever happens, nothing of it is left unless put() took it."""
        staged = Staged(self.temp_folder)
        try:
            yield staged
        finally:
            staged.discard()

    def put(self, staged):
        """Move a staged file into the store durably; return its new key."""
        key = secrets.token_hex(16)
        os.fsync(staged.file.fileno())
        staged.file.close()
        os.rename(staged.path, self.local_path(key))
        fsync_dir(self.root)
        return key

    def local_path(self, key):
        """The file behind key, for sendfile."""
        return os.path.join(self.root, key + ".qcow2")

    def open(self, key):
        """Open the stored file for reading."""
        return open(self.local_path(key), "rb")

    def delete(self, key):
        """Remove a stored file; one already gone is no error."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path(key))

    def keys(self, older_than=0):
        """Keys of the stored files last changed more than older_than seconds ago."""
        limit = time.time() - older_than
        with os.scandir(self.root) as entries:
            return [e.name[:-6] for e in entries
                    if e.name.endswith(".qcow2") and e.stat().st_mtime <= limit]

    def sweep(self):
        """Remove what killed workers left in the temporary folder."""
        return sweep_temp_folder(self.temp_folder)

    def check_writable(self):
        """Raise OSError when the store cannot take a new file."""
        with self.staging() as staged:
            staged.file.write(b"ok")


def storage_from_url(url):
    """Pick the backend by the URL's scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    raise ValueError(f"unsupported STORAGE_URL scheme {parsed.scheme!r} (use file://)")
