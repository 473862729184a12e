"""Image files in a local folder (STORAGE_URL file:///folder), behind storage.py's interface."""

import contextlib
import os
import secrets
import time

from staging import TEMP_SUFFIX, IntentJournal, StagingArea, folder_down_is_unavailable, fsync_dir
from storage import OBJECT_SUFFIX, UploadGone


class LocalStorage:
    """Image files in a folder, with a private staging folder inside it (.incoming)."""

    # How errors and /healthz name this store and its disk.
    FOLDER_NAME = "the image store (file storage)"
    DISK_NAME = "storage"
    # Unfinished resumable uploads, one file each: on the store's disk, so that the last
    # piece's file is kept by one rename; outside the staging folder, whose sweep removes
    # whatever no live process wrote.
    UPLOADS_FOLDER = ".uploads"

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

    def upload_path(self, upload_id):
        """The file of an unfinished resumable upload (for this backend and the tests)."""
        return os.path.join(self.root, self.UPLOADS_FOLDER, upload_id + TEMP_SUFFIX)

    def begin_upload(self, upload_id, length):
        """An empty file for the upload's pieces; no state beyond its name."""
        path = self.upload_path(upload_id)
        with self._root_down():
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return {}

    @contextlib.contextmanager
    def upload_piece(self, upload_id, state, offset):
        """The upload's file, cut back to offset and written from there; what keep() did
        not keep is cut off again at the block's end. The caller holds the upload's lock."""
        with self._root_down():
            try:
                file = open(self.upload_path(upload_id), "r+b", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise UploadGone(f"no file for upload {upload_id}") from None
        piece = None
        try:
            piece = LocalPiece(file, offset)
            yield piece
        finally:
            if piece is not None and file.tell() > piece.kept:
                with contextlib.suppress(OSError):  # the next piece cuts it back anyway
                    file.truncate(piece.kept)
            file.close()

    @contextlib.contextmanager
    def complete_upload(self, upload_id, state):
        """The upload's own file, which store() moves into the store as put() does."""
        with self._root_down():
            try:
                file = open(self.upload_path(upload_id), "r+b", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise UploadGone(f"no file for upload {upload_id}") from None
        try:
            yield FinishedFile(self, self.upload_path(upload_id), file)
        finally:
            file.close()

    def abort_upload(self, upload_id, state):
        """Remove the upload's file, if it is still there."""
        with contextlib.suppress(FileNotFoundError), self._root_down():
            os.unlink(self.upload_path(upload_id))


class LocalPiece:
    """A piece written into its upload's file from offset on."""

    def __init__(self, file, offset):
        size = os.fstat(file.fileno()).st_size
        if size < offset:  # only a machine that crashed before writing its cache does this
            raise UploadGone("the upload's file is shorter than its recorded offset")
        if size > offset:
            file.truncate(offset)  # what a killed request wrote past the offset is dropped
        file.seek(offset)
        self.file, self.kept = file, offset

    def keep(self, size, complete):
        """Count size more bytes.

        Not synced to the disk piece by piece: a killed worker loses nothing of the page
        cache, and a sync per piece cost 7% of a 1 GiB upload in 64 MiB pieces (20-30 ms
        each, docs/platform.md); the whole file is synced once, when it is stored (put). A
        machine that crashes may leave the file shorter than its recorded offset: that
        upload is gone.
        """
        self.kept += size
        return {}


class FinishedFile:
    """A whole upload's file; store() gives it its key as LocalStorage.put does a staged one."""

    def __init__(self, store, path, file):
        self._store, self.path, self.file = store, path, file

    def store(self):
        return self._store.put(self)


def _changed_before(entry, limit):
    """Whether a folder entry was last changed before limit; one deleted meanwhile (a
    racing DELETE during a sweep) was not, and is no orphan."""
    try:
        return entry.stat().st_mtime <= limit
    except FileNotFoundError:
        return False
