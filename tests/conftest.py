"""Fixtures: an app on a temporary instance folder and database, users with tokens,
real qcow2 images made by qemu-img, and a real gunicorn for end-to-end tests.

Every test that uses `app` runs on SQLite, and again on PostgreSQL when
TEST_DATABASE_URL=postgresql://... is set (.ci/run sets it). Each test session
works in a schema of its own in that database, so that several people can run
the suite against one PostgreSQL at once. S3 tests talk to a real S3 protocol
server on loopback: moto_server, started once a session.
"""

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import boto3
import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from auth import issue_token, parse_scopes  # noqa: E402
from localstore import LocalStorage  # noqa: E402
from models import MODELS, User, create_tables, db, open_database  # noqa: E402

ALL_SCOPES = "image:read,write,delete"
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
ENGINES = ("sqlite", "postgresql") if TEST_DATABASE_URL else ("sqlite",)
needs_postgres = pytest.mark.skipif(
    not TEST_DATABASE_URL,
    reason="needs PostgreSQL: set TEST_DATABASE_URL=postgresql://user@host/db (.ci/run does)")
SCHEMA_PREFIX = "imagestore_test_"
# Schemas of test runs that died without dropping theirs; a live run is far younger.
STALE_SCHEMA_SECONDS = 6 * 3600


@dataclass
class Account:
    """A user and a bearer token of theirs, ready to send."""

    user: User
    token: str

    @property
    def headers(self):
        return {"Authorization": f"Bearer {self.token}"}


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


@pytest.fixture
def make_app(database_url, tmp_path):
    """Build an app on the test's database, a temporary instance and image folder;
    keyword arguments override settings."""

    def make(**config):
        return create_app(
            {
                "TESTING": True,
                "DATABASE_URL": database_url,
                "STORAGE_URL": f"file://{tmp_path / 'images'}",
                "SECRET_KEY": "test-secret",
                **config,
            },
            instance_path=str(tmp_path / "instance"),
        )

    return make


@pytest.fixture
def app(make_app):
    """The app on a fresh database (SQLite, or PostgreSQL too in CI) and image folder."""
    return make_app()


@dataclass
class S3Server:
    """moto_server on loopback: an S3 endpoint that boto3 talks to over HTTP as to AWS."""

    endpoint: str

    @property
    def env(self):
        """The standard variables that point boto3 (in the app or a server) at it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def wait_for_http(url, process, log, timeout=30):
    """Wait until url answers at all; raise with the end of the log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{url} never answered: " + log.read_text(errors="replace")[-2000:])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server from the venv on a free loopback port, for this test session."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
               "-p", str(port)]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # A file, not a pipe: moto logs every request, and a full pipe would stop it.
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process, log)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Bucket:
    """A bucket on the S3 server, with a look at what it holds."""

    name: str
    client: object

    def objects(self, prefix=""):
        """{object name: size} of every object under prefix."""
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return {o["Key"]: o["Size"] for o in listing.get("Contents", ())}

    def unfinished_uploads(self):
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A new bucket, with the AWS_* variables set so that boto3 in the app finds it."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client = s3_server.client()
    bucket = Bucket(f"test-{secrets.token_hex(6)}", client)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    for name in bucket.objects():
        client.delete_object(Bucket=bucket.name, Key=name)
    for upload in bucket.unfinished_uploads():
        client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=bucket.name)


@pytest.fixture
def s3_app(make_app, s3_bucket):
    """The app storing image files in s3://BUCKET/images, downloads redirected."""
    return make_app(STORAGE_URL=f"s3://{s3_bucket.name}/images")


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def make_account(app):
    """Make a user (if new) and a token with the given scopes."""

    def make(username="alice", scopes=ALL_SCOPES):
        user = User.get_or_none(User.username == username) or User.create(
            username=username, email=f"{username}@example.com")
        return Account(user, issue_token(user, parse_scopes(scopes)))

    return make


@pytest.fixture
def alice(make_account):
    return make_account("alice")


@pytest.fixture
def bob(make_account):
    return make_account("bob")


def make_qcow2(path, size="64M", *options):
    """Create a qcow2 image with the real qemu-img."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), size]
    subprocess.run(cmd, check=True)
    return Path(path)


@pytest.fixture(scope="session")
def qcow2_bytes(tmp_path_factory):
    """The bytes of a small, valid, empty qcow2 image (made once)."""
    return make_qcow2(tmp_path_factory.mktemp("img") / "small.qcow2").read_bytes()


@pytest.fixture
def upload(client, qcow2_bytes):
    """POST an image (by default the small valid one) and return the response."""

    def post(account, name="img", data=None, namespace=None, **kwargs):
        query = {"name": name} if name is not None else {}
        if namespace is not None:
            query["namespace"] = namespace
        if data == b"":  # the test client drops an explicit Content-Length: 0
            kwargs.setdefault("environ_overrides", {"CONTENT_LENGTH": "0"})
        return client.post("/images", query_string=query, headers=account.headers,
                           data=qcow2_bytes if data is None else data, **kwargs)

    return post


def files_under(folder):
    """Every file below folder, temporary ones included, as relative paths."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def local_store(app):
    """The app's store, which must be the local one (file://).

    The one place where tests know how LocalStorage lays out its folder: a test that plants,
    removes or lists files by hand asks store_folder() or stored_path(), not the backend.
    Staged files and intents are in storage.staging_folder, which every backend has.
    """
    store = app.extensions["storage"]
    assert isinstance(store, LocalStorage), "this test needs a file:// store"
    return store


def store_folder(app):
    """The local store's folder: stored files, and its staging folder inside it."""
    return local_store(app).root


def stored_path(app, key):
    """The local file that holds key's image."""
    return local_store(app).local_path(key)


@pytest.fixture
def store_files(app):
    """A function listing every file in the store, its temporary folder included."""
    root = store_folder(app)
    return lambda: files_under(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_command(kind="web"):
    """The command of one Procfile line, so the tests start exactly what a platform would."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == kind:
            return command.split()
    raise LookupError(kind)


@dataclass
class LiveServer:
    """A real gunicorn serving the app on loopback."""

    url: str
    instance: Path
    env: dict
    process: subprocess.Popen

    def flask(self, *args):
        """Run an admin command against this server's instance; return its stdout."""
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args],
                                cwd=ROOT, env=self.env, check=True, capture_output=True,
                                text=True)
        return result.stdout.strip()

    def account(self, username, scopes=ALL_SCOPES):
        """Create a user through the CLI and return its bearer headers."""
        self.flask("user", "create", username, f"{username}@example.com")
        token = self.flask("token", "create", username, "--scope", scopes)
        return {"Authorization": f"Bearer {token}"}

    def worker_pids(self):
        """The pids of gunicorn's workers (the master's children), in order."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # a process that ended meanwhile
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return sorted(pids)


def start_server(instance, extra_env=None, port=None):
    """Start gunicorn from the Procfile's web line and wait until /healthz answers."""
    port = port or free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1",
           "IMAGESTORE_INSTANCE": str(instance), "WEB_CONCURRENCY": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra_env or {})}
    for name in ("DATABASE_URL", "STORAGE_URL", "PUBLIC_URL"):
        if name not in (extra_env or {}):
            env.pop(name, None)
    Path(instance).mkdir(parents=True, exist_ok=True)
    # A file, not a pipe: a pipe nobody reads would block the server once it fills.
    log = open(Path(instance) / "gunicorn.log", "ab")  # noqa: SIM115 - the server holds it
    process = subprocess.Popen(procfile_command(), cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return LiveServer(url, Path(instance), env, process)
        except OSError:
            time.sleep(0.1)
    process.kill()
    output = (Path(instance) / "gunicorn.log").read_text(errors="replace")
    raise RuntimeError("gunicorn did not start: " + output[-2000:])


def stop_server(server):
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A gunicorn started as the Procfile says, on a free port, for this test module."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    stop_server(server)
