"""Image files in a local folder (STORAGE_URL file:///folder), behind storage.py's interface."""

import contextlib
import os
import secrets
import time

from staging import IntentJournal, StagingArea, folder_down_is_unavailable, fsync_dir
from storage import OBJECT_SUFFIX


class LocalStorage:
    """Image files in a folder, with a private staging folder inside it (.incoming)."""

    # How errors and /healthz name this store and its disk.
    FOLDER_NAME = "the image store (file storage)"
    DISK_NAME = "storage"

    def __init__(self, root):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        # On the same filesystem as the store, so put() is one rename.
        self._staging = StagingArea(os.path.join(self.root, ".incoming"), self.FOLDER_NAME)
        self.intents = IntentJournal(self._staging.folder, self.FOLDER_NAME)
        self.staging_folder = self._staging.folder

    @classmethod
    def from_url(cls, url, **options):
        """The store in url's path; STAGING_DIR does not apply (staging stays on its disk)."""
        return cls(url.path)

    def staging(self):
        """A staged file for an upload, removed at the block's end unless put() took it."""
        return self._staging.staging()

    def put(self, staged):
        """Move a staged file into the store durably; return its new key.

        The key is left with an intent of this process, which the caller settles once the
        row is committed (or the file removed again).
        """
        key = secrets.token_hex(16)
        self.intents.intend(key)
        try:
            with self._root_down():
                os.fsync(staged.file.fileno())
                staged.file.close()
                os.rename(staged.path, self.local_path(key))
                fsync_dir(self.root)
        except BaseException:
            self.delete(key)
            self.intents.settle(key)
            raise
        return key

    def _root_down(self, access="writable"):
        return folder_down_is_unavailable(self.root, self.FOLDER_NAME, access)

    def local_path(self, key):
        """The file behind key (for this backend and the tests' helpers alone)."""
        return os.path.join(self.root, key + OBJECT_SUFFIX)

    def open(self, key):
        """Open the stored file for reading (a real file: downloads go out by sendfile).

        FileNotFoundError when this one file is gone (a racing delete); StorageUnavailable
        when the whole folder is.
        """
        with self._root_down("readable"):
            return open(self.local_path(key), "rb")

    def download_url(self, key, filename, mimetype):
        """None: local files are served by this app itself."""
        return None

    def delete(self, key):
        """Remove a stored file; one already gone is no error, a store that is gone is."""
        with contextlib.suppress(FileNotFoundError), self._root_down():
            os.unlink(self.local_path(key))

    def keys(self, older_than=0):
        """Keys of the stored files last changed more than older_than seconds ago."""
        limit = time.time() - older_than
        with self._root_down("readable"), os.scandir(self.root) as entries:
            return [e.name.removesuffix(OBJECT_SUFFIX) for e in entries
                    if e.name.endswith(OBJECT_SUFFIX) and _changed_before(e, limit)]

    def check_writable(self):
        """Raise OSError when the store cannot take a new file."""
        self._staging.check_writable()

    def free_space(self):
        """Bytes free on the store's disk (staging is on it too)."""
        return self._staging.free_space()

    def sweep(self):
        """Remove what killed workers left in the staging folder, but for intents."""
        return self._staging.sweep()


def _changed_before(entry, limit):
    """Whether a folder entry was last changed before limit; one deleted meanwhile (a
    racing DELETE during a sweep) was not, and is no orphan."""
    try:
        return entry.stat().st_mtime <= limit
    except FileNotFoundError:
        return False
