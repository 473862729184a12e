"""The room that uploads must leave free on the disks of the store and of the database.

A delete writes to the database before it frees the file's space, and SQLite needs room
for that: uploads stop while less than MIN_FREE_SPACE would be left, so the disk never
fills up to the last byte by uploads, and a delete always finds room.
"""

import os

from peewee import SqliteDatabase

from errors import ApiError
from models import db
from staging import free_bytes


def database_folder():
    """The folder of the SQLite database file, or None for a database on a server."""
    database = db.obj
    if not isinstance(database, SqliteDatabase) or database.database in ("", ":memory:"):
        return None
    return os.path.dirname(os.path.abspath(database.database))


def _same_disk(path, other):
    return os.stat(path).st_dev == os.stat(other).st_dev


def parts_short_of_space(storage, reserve, incoming=0):
    """The disks ("database", then the store's) with less than reserve bytes free once
    incoming more bytes were written to the store."""
    store_free = storage.free_space()  # first: StorageUnavailable when the store is down
    short = []
    folder = database_folder()
    if folder is not None:
        landing_here = incoming if _same_disk(folder, storage.staging_folder) else 0
        if free_bytes(folder) < reserve + landing_here:
            short.append("database")
    if store_free < reserve + incoming:
        short.append(storage.DISK_NAME)
    return short


def check_room_for_upload(storage, reserve, length):
    """Refuse an upload with 507 before it is read when it would leave too little room.

    length is the body's Content-Length, or None for a chunked body (then only the reserve
    itself is checked; a body that fills the disk while it is written is still a 507).
    """
    short = parts_short_of_space(storage, reserve, length or 0)
    if short:
        raise ApiError(507, "Insufficient Storage: too little free space on the "
                            f"{' and '.join(short)} disk")
