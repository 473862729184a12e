"""Fixtures of the database each test runs on: a fresh SQLite file, and, when
TEST_DATABASE_URL=postgresql://... is set (.ci/run sets it), PostgreSQL as well.

Each test session works in PostgreSQL schemas of its own, dropped at its end, so that
several people can run the suite against one PostgreSQL at once. A pytest plugin of
conftest.py (its `pytest_plugins`).
"""

import os
import secrets
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg2
import pytest

from models import MODELS, create_tables, db, open_database

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
ENGINES = ("sqlite", "postgresql") if TEST_DATABASE_URL else ("sqlite",)
needs_postgres = pytest.mark.skipif(
    not TEST_DATABASE_URL,
    reason="needs PostgreSQL: set TEST_DATABASE_URL=postgresql://user@host/db (.ci/run does)")
SCHEMA_PREFIX = "imagestore_test_"
# Schemas of test runs that died without dropping theirs; a live run is far younger.
STALE_SCHEMA_SECONDS = 6 * 3600


def with_search_path(url, schema):
    """url with every connection's search_path set to schema (libpq's `options`)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), ("options", f"-c search_path={schema}")]
    return urlunsplit(parts._replace(query=urlencode(query)))


class PostgresSchemas:
    """Schemas of this test session in TEST_DATABASE_URL's database, dropped at its end."""

    def __init__(self, url):
        self.url = url
        self.made = []
        self._drop_stale()

    def _execute(self, sql):
        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def new(self):
        """A fresh empty schema; return a DATABASE_URL whose connections work in it."""
        name = f"{SCHEMA_PREFIX}{int(time.time())}_{os.getpid()}_{secrets.token_hex(3)}"
        self._execute(f"CREATE SCHEMA {name}")
        self.made.append(name)
        return with_search_path(self.url, name)

    def drop_all(self):
        for name in self.made:
            self._execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def _drop_stale(self):
        rows = self._execute("SELECT nspname FROM pg_namespace")
        for (name,) in rows:
            stamp = name.removeprefix(SCHEMA_PREFIX).split("_")[0]
            if name.startswith(SCHEMA_PREFIX) and stamp.isdigit() \
                    and time.time() - int(stamp) > STALE_SCHEMA_SECONDS:
                self._execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture(scope="session")
def pg_schemas():
    """Make fresh PostgreSQL schemas (skips the test without TEST_DATABASE_URL)."""
    if not TEST_DATABASE_URL:
        pytest.skip("needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)")
    schemas = PostgresSchemas(TEST_DATABASE_URL)
    yield schemas
    schemas.drop_all()


@pytest.fixture(scope="session")
def pg_session_url(pg_schemas):
    """The schema, with tables, that the `app` fixture's PostgreSQL runs share."""
    url = pg_schemas.new()
    open_database(url)
    create_tables()
    return url


def empty_tables():
    """Delete every row and restart the ids. Measured here: about 10 ms, where
    TRUNCATE ... RESTART IDENTITY takes 300-400 ms (it makes new files for each table)."""
    with db.connection_context(), db.atomic():
        # A connection left inside a transaction would block this: fail, don't hang.
        db.execute_sql("SET LOCAL lock_timeout = '10s'")
        for model in reversed(MODELS):  # images before namespaces before users
            db.execute_sql(f'DELETE FROM "{model._meta.table_name}"')
        db.execute_sql("SELECT setval(oid, 1, false) FROM pg_class WHERE relkind = 'S' "
                       "AND relnamespace = current_schema()::regnamespace")


@pytest.fixture(params=ENGINES)
def database_url(request, tmp_path):
    """A fresh SQLite file, or this session's PostgreSQL schema emptied for the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
    else:
        yield request.getfixturevalue("pg_database_url")
    if not db.is_closed():
        db.close()


@pytest.fixture
def pg_database_url(pg_session_url):
    """This session's PostgreSQL schema, emptied for the test."""
    open_database(pg_session_url)
    empty_tables()
    yield pg_session_url
    if not db.is_closed():
        db.close()
