"""A lock for each resumable upload, held by the request that writes a piece of it, and
let go when that request ends or its process dies (kill -9 included).

Two requests must not write one upload at once: pieces go into one file (local store) or
one S3 multipart upload, at the upload's offset. The lock lives where every instance that
shares the upload also meets: the database. On PostgreSQL it is a session advisory lock on
the request's own connection, which the server drops with the connection; on SQLite, all
instances are on the machine that holds the file, and it is a flock(2) on a small file
beside it, which the kernel drops with the process. Neither is ever waited for: a second
writer is told at once (UploadBusy).
"""

import contextlib
import fcntl
import hashlib
import os
import tempfile

from peewee import PeeweeException, PostgresqlDatabase

from models import db


class UploadBusy(Exception):
    """Another request is writing a piece of this upload."""


@contextlib.contextmanager
def upload_lock(upload_id):
    """Hold upload_id's lock for the block; UploadBusy when another request holds it."""
    if isinstance(db.obj, PostgresqlDatabase):
        with _advisory_lock(_lock_key(upload_id)):
            yield
    else:
        with _file_lock(lock_path(upload_id)):
            yield


def _lock_key(upload_id):
    """The 64-bit key of the upload's advisory lock."""
    digest = hashlib.sha256(f"imagestore upload {upload_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _advisory_lock(key):
    if not db.execute_sql("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        raise UploadBusy()
    try:
        yield
    finally:
        # A connection that broke meanwhile took its locks with it.
        with contextlib.suppress(PeeweeException):
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (key,))


def lock_path(upload_id):
    """The file whose flock is the upload's lock on SQLite, beside the database file."""
    database = db.obj.database
    folder = (f"{os.path.abspath(database)}-upload-locks"
              if database not in ("", ":memory:") else tempfile.gettempdir())
    return os.path.join(folder, f"{upload_id}.lock")


@contextlib.contextmanager
def _file_lock(path):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UploadBusy() from None
        yield
    finally:
        os.close(fd)


def forget_lock(upload_id):
    """Remove the lock's file once its upload's row is gone (nothing to do on PostgreSQL).

    A request that opened it just before still holds its lock on the removed file, and
    one that opens it anew makes another: both then find no row, and write nothing.
    """
    if not isinstance(db.obj, PostgresqlDatabase):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(upload_id))
