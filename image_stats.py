"""How many images are stored and how many bytes their files hold, kept in one row.

A count and a sum over the image table took 34 ms on 100k rows (SQLite and PostgreSQL
alike, docs/observability.md): too slow to run at every scrape of /metrics. So the totals
are one row, changed in the same transaction as each image that is stored or deleted, and
read by its key. `recount` sets them from the table itself, at every start of an instance,
which also makes the row on a new database or one from before it existed.
"""

from peewee import SqliteDatabase, fn

import compiled
from models import Image, ImageStats, db, write_transaction

ROW_ID = 1


def change(images, nbytes):
    """Add images and nbytes (negative to take away) to the totals; call it inside the
    transaction that stores or deletes the image, as its last statement (it locks the row
    until the commit)."""
    ImageStats.update(images=ImageStats.images + images, bytes=ImageStats.bytes + nbytes).where(
        ImageStats.id == ROW_ID).execute()


def _row_query():
    """The totals' row; compiled once (compiled.py), as every scrape reads it."""
    return ImageStats.select(ImageStats.images, ImageStats.bytes).where(
        ImageStats.id == ROW_ID)


def read():
    """(images, bytes) stored; (0, 0) before the first recount."""
    found = compiled.rows(_row_query, {})
    return tuple(found[0]) if found else (0, 0)


def recount():
    """Set the totals from the image table (an image is stored once it has its file's size);
    nothing is written when they are right already (a start on a full disk can still read).

    On PostgreSQL the row is locked first (FOR UPDATE), so that an image another instance
    records meanwhile is either in the count or adds itself after it; SQLite's write
    transaction lets nobody else write meanwhile.
    """
    with write_transaction():
        row = _row_query()
        if not isinstance(db.obj, SqliteDatabase):
            row = row.for_update()
        row = row.tuples().first()
        images, nbytes = Image.select(fn.COUNT(Image.id), fn.COALESCE(fn.SUM(Image.size), 0)
                                      ).where(Image.size.is_null(False)).tuples().get()
        totals = {"images": images, "bytes": int(nbytes)}
        if row is None:
            ImageStats.insert(id=ROW_ID, **totals).on_conflict_ignore().execute()
        elif tuple(row) != (totals["images"], totals["bytes"]):
            ImageStats.update(**totals).where(ImageStats.id == ROW_ID).execute()
