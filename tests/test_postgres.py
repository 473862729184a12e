"""PostgreSQL itself: schema creation (init-db, several instances at once), the URL forms
that platforms hand out, and SQL that must mean the same as on SQLite.

Skipped without TEST_DATABASE_URL; .ci/run sets it. Every API test runs on
PostgreSQL as well through the `app` fixture.
"""

import os
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from conftest import ROOT, SCHEMA_PREFIX, TEST_SECRET_KEY, needs_postgres
from playhouse.db_url import parse

from app import create_app
from auth import issue_token, parse_scopes
from harness import run_flask
from models import MODELS, Image, User, db

pytestmark = needs_postgres


def tables_in(url):
    """The table names in the schema that url's connections work in."""
    conn = psycopg2.connect(**parse(url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            return sorted(row[0] for row in cur.fetchall())
    finally:
        conn.close()


def flask_cli(database_url, tmp_path, *args):
    """Run `flask --app app ARGS` as the Procfile's release line does."""
    env = {**os.environ, "DATABASE_URL": database_url,
           "IMAGESTORE_INSTANCE": str(tmp_path / "instance")}
    env.pop("STORAGE_URL", None)
    return run_flask(env, *args, check=False, timeout=60)


def heroku_style(url):
    """The same URL with the postgres:// scheme that Heroku hands out."""
    return urlunsplit(urlsplit(url)._replace(scheme="postgres"))


@pytest.fixture
def pg_app(pg_database_url, tmp_path):
    return create_app({"TESTING": True, "DATABASE_URL": pg_database_url,
                       "STORAGE_URL": f"file://{tmp_path / 'images'}",
                       "SECRET_KEY": TEST_SECRET_KEY}, instance_path=str(tmp_path / "instance"))


def test_init_db_creates_the_tables_and_can_run_again(pg_schemas, tmp_path):
    url = pg_schemas.new()
    assert tables_in(url) == []
    for _ in range(2):
        result = flask_cli(heroku_style(url), tmp_path, "init-db")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "database ready"
    assert tables_in(url) == sorted(m._meta.table_name for m in MODELS)


def test_instances_starting_together_create_the_schema_once(pg_schemas, tmp_path):
    """Four processes create the tables on an empty schema at the same moment."""
    url = pg_schemas.new()
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from models import create_tables, open_database\n"
        "open_database(sys.argv[1])\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
        "create_tables()\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, url, str(go)], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    go.touch()
    errors = [p.communicate(timeout=60)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], errors
    assert tables_in(url) == sorted(m._meta.table_name for m in MODELS)


def test_each_test_session_works_in_its_own_schema(pg_app):
    with pg_app.app_context():
        (schema,) = db.execute_sql("SELECT current_schema()").fetchone()
    assert schema.startswith(SCHEMA_PREFIX)
    assert Image._meta.table_name in tables_in(pg_app.config["DATABASE_URL"])


def test_search_matches_percent_and_underscore_literally(pg_app, qcow2_bytes):
    client = pg_app.test_client()
    user = User.create(username="alice", email="alice@example.com")
    headers = {"Authorization": f"Bearer {issue_token(user, parse_scopes('image:read,write'))}"}
    for name in ("a_b", "axb", "Go_Dev"):
        created = client.post(f"/images?name={name}", headers=headers, data=qcow2_bytes)
        assert created.status_code == 201, created.json
    found = client.get("/images?search=_", headers=headers).json
    assert sorted(i["name"] for i in found) == ["Go_Dev", "a_b"]
    found = client.get("/images?search=go_d", headers=headers).json
    assert [i["name"] for i in found] == ["Go_Dev"]
    assert client.get("/images?search=%25", headers=headers).json == []
