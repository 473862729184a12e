"""Database models, and the one database object that the app factory initialises."""

import contextlib
import sqlite3
import threading
from datetime import UTC, datetime

import peewee
from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BlobField,
    CharField,
    DatabaseProxy,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    NodeList,
    PostgresqlDatabase,
    SqliteDatabase,
    TextField,
)
from playhouse.db_url import connect
from playhouse.migrate import PostgresqlMigrator, migrate
from playhouse.pool import PooledDatabase

db = DatabaseProxy()

# Set on every connection. WAL, which lets readers go on while an upload commits, is not
# here: it is kept in the file itself, and use_wal() sets it once per start.
SQLITE_PRAGMAS = {
    "foreign_keys": 1,
    "synchronous": "normal",
    # Copy every commit into the database file at once, while there is room for it: on a
    # full disk the next write (a delete) then reuses the WAL from its start instead of
    # growing it, and the file has no pages left to grow by (keep_wal below).
    "wal_autocheckpoint": 1,
}
# Seconds a statement waits for another connection's lock before 'database is locked', so
# concurrent writers from several gunicorn workers take turns. It is sqlite3's connect
# timeout, not a pragma, so it holds from the connection's first statement on.
SQLITE_BUSY_TIMEOUT = 10
# Tries of use_wal(); each failed one waited for another connection to finish its write.
WAL_ATTEMPTS = 10

VISIBILITIES = ("private", "internal", "public")


def utcnow():
    """Now in UTC, naive and in whole seconds, as the API shows it."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class DateTimeField(peewee.DateTimeField):
    """peewee's DateTimeField, but SQLite's text read back with datetime.fromisoformat.

    peewee tries strptime with one format after another; a list page reads 130 of these
    values, and that parsing was a fifth of the page's time (docs/benchmarks.md).
    """

    def adapt(self, value):
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                return super().adapt(value)
            if parsed.tzinfo is None:
                return parsed
        return super().adapt(value)


class BaseModel(Model):
    class Meta:
        database = db


class User(BaseModel):
    username = CharField(max_length=64, unique=True)
    email = CharField(max_length=254)
    created_at = DateTimeField(default=utcnow)


class Token(BaseModel):
    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    name = CharField(max_length=64, default="")
    token_hash = CharField(max_length=64, unique=True)
    scopes = CharField(max_length=255)
    created_at = DateTimeField(default=utcnow)


class Namespace(BaseModel):
    user = ForeignKeyField(User, backref="namespaces")
    # A root's root is itself, so "everything under root R" is one equality.
    root = ForeignKeyField("self", null=True, backref="descendants", on_delete="CASCADE")
    parent = ForeignKeyField("self", null=True, backref="children", on_delete="CASCADE")
    name = CharField(max_length=32)
    path = CharField(max_length=700)
    description = TextField(default="")
    visibility = CharField(max_length=16, default="private")
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("user", "path"), True),)


class Collaborator(BaseModel):
    namespace = ForeignKeyField(Namespace, backref="collaborators", on_delete="CASCADE")
    user = ForeignKeyField(User, backref="collaborations", on_delete="CASCADE")

    class Meta:
        indexes = ((("namespace", "user"), True),)


class NeverReusedId(AutoField):
    """An id that is never handed out again after its row is deleted.

    SQLite's plain integer key reuses the largest id once its row is gone, so a client
    holding a deleted image's id could reach (or delete) the next upload; AUTOINCREMENT
    stops that. PostgreSQL's sequences never reuse ids anyway.
    """

    def ddl(self, ctx):
        node = super().ddl(ctx)
        if isinstance(db.obj, SqliteDatabase):
            return NodeList((node, SQL("AUTOINCREMENT")))
        return node


class Image(BaseModel):
    id = NeverReusedId()
    author = ForeignKeyField(User, backref="authored_images")
    user = ForeignKeyField(User, backref="images")
    namespace = ForeignKeyField(Namespace, null=True, backref="images")
    name = CharField(max_length=64)
    # The file's columns are NULL only while an import from a URL has not finished.
    storage_key = CharField(max_length=128, unique=True, null=True)
    size = BigIntegerField(null=True)
    virtual_size = BigIntegerField(null=True)
    sha256 = CharField(max_length=64, null=True)
    created_at = DateTimeField(default=utcnow, index=True)
    # An import from a URL (API.md "import from a URL"); all NULL for an uploaded image.
    download_source = TextField(null=True)  # the URL as shown: any password removed
    download_error = TextField(null=True)
    download_created_at = DateTimeField(null=True)
    download_started_at = DateTimeField(null=True)
    download_finished_at = DateTimeField(null=True)

    class Meta:
        indexes = (
            (("namespace", "name"), True),
            (("user", "created_at", "id"), False),
            (("namespace", "created_at", "id"), False),
        )


# Outside namespaces a name is unique per owner; NULL namespaces are distinct
# in a plain unique index, so this needs a partial one (SQLite and PostgreSQL both have them).
Image.add_index(Image.index(Image.user, Image.name, unique=True).where(Image.namespace.is_null()))

class Upload(BaseModel):
    """A tus upload (tus.py, tusuploads.py): where it goes, how far it is, where its bytes are."""

    id = CharField(primary_key=True, max_length=64)  # random: knowing it is reaching the upload
    user = ForeignKeyField(User, backref="uploads", on_delete="CASCADE")
    name = CharField(max_length=64)
    namespace = TextField(null=True)  # `path[@owner]` as the client wrote it
    length = BigIntegerField()
    offset = BigIntegerField(default=0)  # bytes received and kept
    metadata = TextField(default="{}")  # Upload-Metadata, decoded, as JSON
    sha256 = CharField(max_length=64, null=True)  # what the metadata says the file's is
    hash_state = TextField(null=True)  # the sha256 of bytes 0..offset, resumable (resumablehash.py)
    head = BlobField(null=True)  # the first bytes, until the header's HEADER_READ_SIZE are in
    state = TextField(default="{}")  # the storage backend's own (an S3 multipart upload), as JSON
    image = ForeignKeyField(Image, null=True, on_delete="SET NULL")  # once done
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)
    # Whose quota it counts against until it ends (quotas.pending_usage): the image's owner,
    # and the root of the namespace it goes to (None outside namespaces, or for a root that
    # did not exist yet when the upload was made).
    owner = ForeignKeyField(User, backref="owned_uploads", on_delete="CASCADE")
    root = ForeignKeyField(Namespace, null=True, on_delete="SET NULL")



class Webhook(BaseModel):
    """A URL that gets the images events of a namespace and its children (webhooks.py)."""

    namespace = ForeignKeyField(Namespace, backref="webhooks", on_delete="CASCADE")
    url = TextField()
    # Kept as given: every delivery is signed with it (HMAC), so it cannot be a hash.
    secret = CharField(max_length=255)
    created_at = DateTimeField(default=utcnow)


class WebhookDelivery(BaseModel):
    """One try of sending one event to one webhook: its HTTP status, or why it failed."""

    webhook = ForeignKeyField(Webhook, backref="deliveries", on_delete="CASCADE")
    event = CharField(max_length=32)  # the same for every try of one event
    action = CharField(max_length=16)
    try_number = IntegerField()
    status = IntegerField(null=True)
    error = TextField(null=True)
    created_at = DateTimeField(default=utcnow)


class Job(BaseModel):
    """Work for the background threads (jobs.py): pending until done (then deleted), or
    failed after its last attempt (kept). Times are seconds since the epoch by the
    database's clock, which every instance shares."""

    kind = CharField(max_length=64)
    payload = TextField()  # JSON
    state = CharField(max_length=16, default="pending")
    run_at = DoubleField()
    attempts = IntegerField(default=0)
    # Who holds the job and until when: a lease, renewed while its handler runs.
    claimed_by = CharField(max_length=128, null=True)
    claimed_until = DoubleField(null=True)
    last_error = TextField(null=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("state", "run_at"), False),)


class ImageStats(BaseModel):
    """One row: how many images are stored and the bytes of their files, changed in the
    transaction of each change (image_stats.py), so that /metrics reads it without a scan."""

    images = BigIntegerField(default=0)
    bytes = BigIntegerField(default=0)


class Quota(BaseModel):
    """Limits on the images of one user, or of one root namespace and all below it (kept on
    the root); a NULL limit is none. quotas.py counts the use against them."""

    user = ForeignKeyField(User, null=True, unique=True, on_delete="CASCADE")
    namespace = ForeignKeyField(Namespace, null=True, unique=True, on_delete="CASCADE")
    max_bytes = BigIntegerField(null=True)
    max_images = BigIntegerField(null=True)
    created_at = DateTimeField(default=utcnow)


# What a quota counts, read without the table (quotas.py): SUM(size) and COUNT(*) of one
# owner's, or one namespace's, images from the index alone.
Image.add_index(Image.index(Image.user, Image.size))
Image.add_index(Image.index(Image.namespace, Image.size))

MODELS = (User, Token, Namespace, Collaborator, Image, Upload, Webhook, WebhookDelivery, Job,
          ImageStats, Quota)


# Any number that all instances share: the key of the advisory lock taken while
# creating tables on PostgreSQL.
SCHEMA_LOCK_KEY = 0x696D6773


def open_database(url):
    """Connect the shared database object to DATABASE_URL (sqlite:// or postgresql://).

    Query parameters go to the driver, e.g. ?sslmode=require for PostgreSQL;
    a percent-encoded user or password is decoded.
    """
    options = {}
    if url.startswith("sqlite"):
        # A pooled connection serves one request, then another thread's: sqlite3 must
        # allow that (each is used by one thread at a time, which is what it guards).
        options = {"pragmas": SQLITE_PRAGMAS, "timeout": SQLITE_BUSY_TIMEOUT,
                   "check_same_thread": False}
    if db.obj is not None:
        release_connections()  # an earlier call's (tests make many apps in one process)
    database = connect(pooled_url(url), unquote_password=True, unquote_user=True,
                       **options, **POOL_OPTIONS)
    db.initialize(database)
    return database


# Connections are kept for the next request instead of made again for each: opening one
# (and setting SQLite's pragmas) was most of a list page's time (docs/benchmarks.md).
# No cap: the pool never holds more than the most requests served at once, which is what
# the service opened without it; a connection is made again after STALE seconds, so that
# none outlives a database restart for long.
POOL_OPTIONS = {"max_connections": 0, "stale_timeout": 300}
POOLED_SCHEMES = {"sqlite": "sqlite+pool", "postgres": "postgres+pool",
                  "postgresql": "postgresql+pool"}


def release_connections():
    """Close this thread's connection and every idle one that the pool keeps."""
    if not db.is_closed():
        db.close()
    if isinstance(db.obj, PooledDatabase):
        db.obj.close_idle()


def pooled_url(url):
    """url with playhouse.db_url's pooled scheme (sqlite+pool://…) where it has one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in POOLED_SCHEMES or rest in ("", "/", "/:memory:"):
        return url  # an in-memory database is one per connection: never pool it
    return f"{POOLED_SCHEMES[scheme]}://{rest}"


# SQLite removes a database's -wal and -shm files when its last connection closes, and
# must write both again on the next open: on a full disk it cannot, and then every query,
# reads included, fails ("disk I/O error"). Requests close their connections, so this
# process holds one more open for its lifetime: no request's close is then the last.
_WAL_KEEPER = {}


def keep_wal(database):
    """Hold a connection to database open, if it is a SQLite file (see above); None lets
    go of the one held.

    Called (by create_app) once the file has tables and is in WAL mode: a connection that
    has only seen an empty file has not opened the WAL yet, and does not keep it.
    """
    earlier = _WAL_KEEPER.pop("connection", None)
    if earlier is not None:
        earlier.close()  # held for the database of an earlier call
    if isinstance(database, SqliteDatabase) and database.database not in ("", ":memory:"):
        keeper = sqlite3.connect(database.database, timeout=10, isolation_level=None,
                                 check_same_thread=False)
        # A read opens the WAL, and leaves no transaction open that would stop checkpoints.
        keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()
        _WAL_KEEPER["connection"] = keeper


def use_wal():
    """Put an SQLite database in WAL mode (kept in the file); nothing for PostgreSQL.

    Switching takes a read lock, then the write lock; when another connection holds the
    write lock meanwhile (another process switching the same new file, say), SQLite answers
    'database is locked' at once instead of waiting its busy timeout, since waiting could
    deadlock. So wait for that writer as SQLite does wait (BEGIN IMMEDIATE), and try again:
    by then the file is usually in WAL mode already.
    """
    if not isinstance(db.obj, SqliteDatabase):
        return
    with db.connection_context():
        for _ in range(WAL_ATTEMPTS):
            try:
                db.execute_sql("PRAGMA journal_mode = wal")
                return
            except peewee.OperationalError as error:
                if "locked" not in str(error):
                    raise
            with db.atomic("IMMEDIATE"):
                pass
    raise peewee.OperationalError(
        f"could not switch the database to WAL mode: another connection was writing "
        f"each of {WAL_ATTEMPTS} times")


def create_tables():
    """Create missing tables and indexes; safe to run again and from several instances.

    On PostgreSQL two concurrent CREATE TABLE IF NOT EXISTS can still collide in
    the catalog (a unique violation on pg_type), so instances that start together
    take turns under a transaction-scoped advisory lock. SQLite's write lock
    already makes them take turns.
    """
    with db.connection_context():
        if isinstance(db.obj, PostgresqlDatabase):
            with db.atomic():
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                db.create_tables(MODELS, safe=True)
        else:
            db.create_tables(MODELS, safe=True)


# What after_commit() was handed in this thread's outermost write_transaction().
_AFTER_COMMIT = threading.local()


@contextlib.contextmanager
def write_transaction():
    """A transaction for writes. On SQLite it takes the write lock at once (IMMEDIATE),
    so that concurrent writers wait on the busy timeout instead of failing with
    'database is locked' when a read transaction tries to upgrade. The outermost one
    calls what after_commit() was given once it has committed."""
    atomic = db.atomic("IMMEDIATE") if isinstance(db.obj, SqliteDatabase) else db.atomic()
    if getattr(_AFTER_COMMIT, "callbacks", None) is not None:
        with atomic:  # nested: the outermost one commits
            yield
        return
    _AFTER_COMMIT.callbacks = callbacks = []
    try:
        with atomic:
            yield
    finally:
        _AFTER_COMMIT.callbacks = None
    for callback in callbacks:
        callback()


def after_commit(callback):
    """Call callback() once the write_transaction() now open has committed, never if it
    rolls back; at once outside one (e.g. within a bare db.atomic(), before its commit)."""
    callbacks = getattr(_AFTER_COMMIT, "callbacks", None)
    if callbacks is None:
        callback()
    else:
        callbacks.append(callback)


# What an image table made before imports from a URL lacks: these columns, and NULL in the
# file's columns (NOT NULL there then).
IMPORT_COLUMNS = ("download_source", "download_error", "download_created_at",
                  "download_started_at", "download_finished_at")
FILE_COLUMNS = ("storage_key", "size", "virtual_size", "sha256")
_UPGRADE_TABLE = "image__upgrade"


def _image_columns():
    """{column: nullable} of the image table as the database has it; {} without one."""
    table = Image._meta.table_name
    if isinstance(db.obj, PostgresqlDatabase):  # peewee's get_columns looks in 'public' only
        rows = db.execute_sql(
            "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s", (table,)).fetchall()
        return dict(rows)
    rows = db.execute_sql(f'PRAGMA table_info("{table}")').fetchall()
    return {name: not notnull for _, name, _, notnull, *_ in rows}


def _is_current(columns):
    """Whether an image table with these columns needs no upgrade (none needs none)."""
    return not columns or (all(name in columns for name in IMPORT_COLUMNS)
                           and all(columns[name] for name in FILE_COLUMNS))


def upgrade_schema():
    """Bring an image table made by an earlier version up to this one: the import's
    columns added, the file's columns allowed NULL. Nothing on a new or current database;
    safe to repeat, and to run from several instances at once (they take turns as in
    create_tables). Runs before create_tables (prepare_instance)."""
    with db.connection_context():
        if isinstance(db.obj, PostgresqlDatabase):
            with db.atomic():
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                _upgrade_postgres(_image_columns())
        elif not _is_current(_image_columns()):
            _upgrade_sqlite()


def _upgrade_postgres(columns):
    """ALTER TABLE: add what is missing, drop the NOT NULLs (inside the caller's lock)."""
    if _is_current(columns):
        return
    migrator = PostgresqlMigrator(db.obj)
    table = Image._meta.table_name
    migrate(*[migrator.add_column(table, name, Image._meta.fields[name])
              for name in IMPORT_COLUMNS if name not in columns],
            *[migrator.drop_not_null(table, name) for name in FILE_COLUMNS if not columns[name]])
    Image._schema.create_indexes(safe=True)  # those of this version, as the SQLite path makes


def _upgrade_sqlite():
    """Rebuild the image table as SQLite's documented way to change a column's NOT NULL
    (ALTER TABLE cannot): a new table, the rows copied, the old one dropped, the new one
    renamed. Foreign keys are off meanwhile (a no-op inside a transaction, so set before),
    so that dropping the old table touches no row that refers to an image."""
    db.execute_sql("PRAGMA foreign_keys = OFF")
    try:
        with db.atomic("IMMEDIATE"):
            columns = _image_columns()  # again, under the write lock: another may have done it
            if not _is_current(columns):
                _rebuild_image_table(columns)
                if db.execute_sql("PRAGMA foreign_key_check").fetchall():
                    raise peewee.IntegrityError("the upgraded image table breaks a foreign key")
    finally:
        db.execute_sql("PRAGMA foreign_keys = ON")


def _rebuild_image_table(columns):
    """Copy the image table into one made from today's model, keeping its ids and the
    AUTOINCREMENT counter (so that no deleted image's id comes back), then its indexes."""
    table = Image._meta.table_name
    counter = db.execute_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    Image._meta.set_table_name(_UPGRADE_TABLE)
    try:
        Image._schema.create_table(safe=False)
    finally:
        Image._meta.set_table_name(table)
    names = ", ".join(f'"{name}"' for name in columns if name in Image._meta.columns)
    db.execute_sql(f'INSERT INTO "{_UPGRADE_TABLE}" ({names}) SELECT {names} FROM "{table}"')
    db.execute_sql(f'DROP TABLE "{table}"')
    db.execute_sql(f'ALTER TABLE "{_UPGRADE_TABLE}" RENAME TO "{table}"')
    if counter is not None:
        db.execute_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        db.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                       (table, max(counter[0], _largest_id())))
    Image._schema.create_indexes(safe=True)


def _largest_id():
    return Image.select(peewee.fn.MAX(Image.id)).scalar() or 0


def locking(query):
    """query, made to lock the rows it selects until the transaction ends: SELECT … FOR
    UPDATE on PostgreSQL. SQLite has no row locks and needs none: a write_transaction holds
    the whole database's write lock from its start."""
    if isinstance(db.obj, SqliteDatabase):
        return query
    return query.for_update()


@contextlib.contextmanager
def unsynced_write():
    """A write transaction whose commit does not wait for the disk, for a write that a
    crash may lose without harm (a tus upload's offset: lost, the client sends that piece
    again). Each piece's commit waited for the disk to take the piece's bytes (ext4 orders
    a commit after the data written before it): 100 ms a piece on a busy machine
    (docs/platform.md).

    SQLite: no checkpoint after the commit (its pages go into the database file with the
    next other write's), where every other commit has one (SQLITE_PRAGMAS); PostgreSQL:
    synchronous_commit off for this transaction.
    """
    if not isinstance(db.obj, SqliteDatabase):
        with db.atomic():
            db.execute_sql("SET LOCAL synchronous_commit TO OFF")
            yield
        return
    db.execute_sql("PRAGMA wal_autocheckpoint = 0")
    try:
        with db.atomic("IMMEDIATE"):
            yield
    finally:
        db.execute_sql(f"PRAGMA wal_autocheckpoint = {SQLITE_PRAGMAS['wal_autocheckpoint']}")
