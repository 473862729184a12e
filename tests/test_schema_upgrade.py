"""models.upgrade_schema: a database made by the version before imports from a URL gets the
import's columns and loses the NOT NULLs of the file's columns, its rows, ids and indexes
kept, on SQLite and PostgreSQL; an instance started on it does that by itself."""

import pytest
from db_fixtures import TEST_DATABASE_URL
from peewee import BigIntegerField, CharField, ForeignKeyField, IntegrityError, Model

from app import create_app
from models import (
    Collaborator,
    DateTimeField,
    Image,
    Namespace,
    NeverReusedId,
    PostgresqlDatabase,
    Token,
    User,
    create_tables,
    db,
    open_database,
    upgrade_schema,
    utcnow,
)

ENGINES = ("sqlite", "postgresql") if TEST_DATABASE_URL else ("sqlite",)


class PreviousImage(Model):
    """The image table as the version before imports made it: no download columns, and
    every file column NOT NULL."""

    id = NeverReusedId()
    author = ForeignKeyField(User, backref="+")
    user = ForeignKeyField(User, backref="+")
    namespace = ForeignKeyField(Namespace, null=True, backref="+")
    name = CharField(max_length=64)
    storage_key = CharField(max_length=128, unique=True)
    size = BigIntegerField()
    virtual_size = BigIntegerField()
    sha256 = CharField(max_length=64)
    created_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        database = db
        table_name = "image"
        legacy_table_names = False  # index names from "image", as Image's are
        indexes = ((("namespace", "name"), True), (("user", "created_at", "id"), False),
                   (("namespace", "created_at", "id"), False))


PreviousImage.add_index(PreviousImage.index(PreviousImage.user, PreviousImage.name,
                                            unique=True).where(PreviousImage.namespace.is_null()))


@pytest.fixture(params=ENGINES)
def new_database(request, tmp_path):
    """A function making an empty database of its own (a SQLite file, or a fresh
    PostgreSQL schema) and opening it; it returns its URL."""
    made = []

    def make():
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'db{len(made)}.sqlite3'}"
        else:
            url = request.getfixturevalue("pg_schemas").new()
        made.append(url)
        open_database(url)
        return url

    yield make
    if not db.is_closed():
        db.close()


def previous_version_database(new_database):
    """A database as the previous version left it: alice with images 1 and 2 (3 deleted)."""
    url = new_database()
    with db.connection_context():
        db.create_tables([User, Token, Namespace, Collaborator, PreviousImage])
        alice = User.create(username="alice", email="alice@example.com")
        for number in (1, 2, 3):
            PreviousImage.create(author=alice, user=alice, name=f"img{number}",
                                 storage_key=f"key{number}", size=number, virtual_size=number,
                                 sha256=f"{number}" * 64)
        PreviousImage.delete().where(PreviousImage.id == 3).execute()
    return url


def table_shape():
    """The image table's columns (name, nullable) and its indexes' definitions."""
    with db.connection_context():
        if isinstance(db.obj, PostgresqlDatabase):
            columns = db.execute_sql(
                "SELECT column_name, is_nullable, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'image'").fetchall()
            indexes = db.execute_sql(
                "SELECT indexname, regexp_replace(indexdef, ' ON [^ ]+ ', ' ON ') FROM "
                "pg_indexes WHERE schemaname = current_schema() AND tablename = 'image'")
            return sorted(columns), sorted(indexes.fetchall())
        table = db.execute_sql("SELECT sql FROM sqlite_master WHERE name = 'image'").fetchall()
        indexes = db.execute_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                 "AND tbl_name = 'image'").fetchall()
        return table, sorted(indexes, key=str)


def test_the_upgraded_table_is_the_table_a_new_database_gets(new_database):
    new_database()
    create_tables()
    fresh = table_shape()
    previous_version_database(new_database)
    assert table_shape() != fresh
    upgrade_schema()
    assert table_shape() == fresh


def test_the_rows_ids_and_rules_of_the_previous_version_are_kept(new_database):
    previous_version_database(new_database)
    upgrade_schema()
    upgrade_schema()  # again: nothing left to do
    with db.connection_context():
        assert [(i.id, i.name, i.storage_key, i.size, i.download_source)
                for i in Image.select().order_by(Image.id)] == [
            (1, "img1", "key1", 1, None), (2, "img2", "key2", 2, None)]
        alice = User.get(User.username == "alice")
        pending = Image.create(author=alice, user=alice, name="import",
                               download_source="https://example.com/a.qcow2",
                               download_created_at=utcnow())
        assert pending.id == 4  # the deleted image's 3 is never handed out again
        with pytest.raises(IntegrityError), db.atomic():
            Image.create(author=alice, user=alice, name="img1", storage_key="other",
                         size=1, virtual_size=1, sha256="0" * 64)


def test_an_instance_started_on_a_previous_version_database_upgrades_it(new_database,
                                                                         tmp_path):
    url = previous_version_database(new_database)
    app = create_app({"DATABASE_URL": url, "STORAGE_URL": f"file://{tmp_path / 'images'}",
                      "SECRET_KEY": "k" * 40}, instance_path=str(tmp_path / "instance"))
    with app.app_context(), db.connection_context():
        alice = User.get(User.username == "alice")
        Image.create(author=alice, user=alice, name="import",
                     download_source="https://example.com/a.qcow2", download_created_at=utcnow())
        assert Image.select().count() == 3
