"""Where image files live: the interface every backend offers, and the registry that picks one.

Every backend stages an upload in a local file (it must be inspected on disk first),
then `put` moves it in under a new key; `open`, `delete`, `keys` and `download_url`
work on keys. storage_from_url picks the backend by the URL's scheme and imports its
module only then, by name: this module imports no backend, so backends (and errors.py)
import from it without a cycle, and nothing else in the code knows which one it has.
docs/architecture.md says how to add one.
"""

import importlib
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

# The name every backend gives a key's file or object.
OBJECT_SUFFIX = ".qcow2"
MiB = 1 << 20

# URL scheme -> "module:Class" of its backend. A module is imported only when a URL with
# its scheme is opened: boto3 is loaded only for s3://.
BACKENDS = {
    "file": "localstore:LocalStorage",
    "s3": "s3storage:S3Storage",
}


class StorageUnavailable(OSError):
    """The store could not be reached or refused the request (not a missing file).

    reason, when given, is a short text fit for clients: it names the store, not its path.
    """

    def __init__(self, message, *, reason=None):
        super().__init__(message)
        self.reason = reason


class UploadGone(Exception):
    """An unfinished resumable upload whose bytes the store no longer has (removed, or its
    S3 multipart upload aborted or completed by a request that then died)."""


class UploadPiece(Protocol):
    """One piece of a resumable upload being received: written in order through file."""

    file: BinaryIO

    def keep(self, size: int, complete: bool) -> dict:
        """Make the first size bytes written part of the upload, durably (complete: they
        end it); return the upload's new backend state."""


class FinishedUpload(Protocol):
    """A resumable upload whose every byte is in, as a local file to inspect at path."""

    path: str
    file: BinaryIO

    def store(self) -> str:
        """Keep the file as a stored file under a new key, left with an intent (as put)."""


class StagedFile(Protocol):
    """An upload being staged: written through file, inspected at path."""

    path: str
    file: BinaryIO


class StoredFile(Protocol):
    """A stored file opened for reading (a real file from a local store: sendfile)."""

    def read(self, size: int = -1) -> bytes: ...
    def seek(self, offset: int) -> int: ...
    def close(self) -> None: ...


class Intents(Protocol):
    """The journal of keys whose file and row are being changed together (staging.IntentJournal)."""

    def intend(self, key: str) -> None:
        """Durably note that this process is about to change key's file and row together."""

    def settle(self, key: str, pid: int | None = None) -> None:
        """Drop the intent on key (of this process, or of pid), once file and row agree."""

    def unsettled(self) -> list[tuple[str, int]]:
        """(key, pid) of the intents whose process died before settling them."""

    def intended_keys(self) -> set[str]:
        """Keys with an intent of any process, live or dead."""


@runtime_checkable
class Storage(Protocol):
    """What the app asks of an image store; every backend is one (by shape, not by base).

    Keys are the store's own names for files (put() makes them). A key being changed
    together with its database row carries an intent in `intents` (put() makes one)
    until it is settled; intents.unsettled() finds those of killed processes for recover().
    """

    DISK_NAME: str  # how /healthz and 507 answers name the disk that uploads land on
    staging_folder: str  # the local folder of staged uploads and intents
    intents: "Intents"  # the journal of keys whose file and row change together

    @classmethod
    def from_url(cls, url, **options) -> "Storage":
        """The backend for a parsed STORAGE_URL; options: staging_dir, redirect_downloads,
        upload_expiry (seconds a resumable upload may live)."""

    def staging(self) -> AbstractContextManager[StagedFile]:
        """A staged file for an upload, removed at the block's end unless put() took it."""

    def put(self, staged: StagedFile) -> str:
        """Store the staged file under a new key, left with an intent; return the key."""

    def open(self, key: str) -> StoredFile:
        """The stored file; FileNotFoundError if it is gone, StorageUnavailable if the store is."""

    def delete(self, key: str) -> None:
        """Remove a stored file; one already gone is no error."""

    def keys(self, older_than: float = 0) -> list[str]:
        """Keys of the stored files last changed more than older_than seconds ago."""

    def download_url(self, key: str, filename: str, mimetype: str) -> str | None:
        """A URL to send the client to for the file, or None to serve it from this app."""

    def check_writable(self) -> None:
        """Raise OSError when the store cannot take a new file."""

    def free_space(self) -> int:
        """Bytes free on the disk that uploads land on (StorageUnavailable when it is down)."""

    def sweep(self) -> int:
        """Remove what killed workers left staged (not intents); return how many files."""

    # Resumable (tus) uploads: an upload's bytes come in pieces, to any process, and its
    # backend state (JSON-able) is kept with the upload's row between them.

    def begin_upload(self, upload_id: str, length: int) -> dict:
        """Make a place for an upload of length bytes; return its backend state."""

    def upload_piece(self, upload_id: str, state: dict,
                     offset: int) -> AbstractContextManager[UploadPiece]:
        """A piece that starts at offset (what a killed request wrote past it is dropped);
        what keep() did not keep is dropped at the block's end. UploadGone if the upload's
        bytes are gone."""

    def complete_upload(self, upload_id: str,
                        state: dict) -> AbstractContextManager[FinishedUpload]:
        """The whole upload as a local file; unless store() took it, the block's end
        removes what completing made (an S3 object), not the upload's pieces."""

    def abort_upload(self, upload_id: str, state: dict) -> None:
        """Remove an unfinished upload's bytes; one already gone is no error."""



def backend_class(scheme):
    """The backend class registered for a URL scheme, its module imported now."""
    target = BACKENDS.get(scheme)
    if target is None:
        known = " or ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(f"unsupported STORAGE_URL scheme {scheme!r} (use {known})")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def storage_from_url(url, staging_dir=None, redirect_downloads=True,
                     upload_expiry=0) -> Storage:
    """The store a STORAGE_URL names: file:///folder or s3://bucket/prefix."""
    parsed = urlparse(url)
    return backend_class(parsed.scheme).from_url(
        parsed, staging_dir=staging_dir, redirect_downloads=redirect_downloads,
        upload_expiry=upload_expiry)
