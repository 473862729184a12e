"""Fixtures: an app on a temporary instance folder and database, users with tokens,
real qcow2 images made by qemu-img, and a real gunicorn for end-to-end tests.

Every test that uses `app` runs on SQLite, and again on PostgreSQL when
TEST_DATABASE_URL=postgresql://... is set (.ci/run sets it): the database fixtures are in
db_fixtures.py. S3 tests talk to a real S3 protocol server on loopback, moto_server: the
fixtures are in s3_fixtures.py. The good and hostile images of the inspection and upload
tests are in image_fixtures.py, and those of the client's tests (tests/test_client*.py) in
client_fixtures.py. The real gunicorn is harness.py's (at the project's top:
bench/run.py and reliability/run.py start theirs with it too).
"""

import contextlib
import http.client
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PLUGINS = ["db_fixtures", "s3_fixtures", "image_fixtures", "client_fixtures"]
# Imported below before pytest loads them as plugins: have their asserts rewritten all the same.
pytest.register_assert_rewrite(*PLUGINS)

from db_fixtures import SCHEMA_PREFIX as SCHEMA_PREFIX  # noqa: E402
from db_fixtures import needs_postgres as needs_postgres  # noqa: E402

import jobs  # noqa: E402
from app import create_app  # noqa: E402
from auth import issue_token, parse_scopes  # noqa: E402
from harness import ALL_SCOPES, start_server, stop_server  # noqa: E402
from harness import LiveServer as LiveServer  # noqa: E402
from harness import free_port as free_port  # noqa: E402
from harness import procfile_command as procfile_command  # noqa: E402
from localstore import LocalStorage  # noqa: E402
from models import Image, User  # noqa: E402

# Long enough for the rule that refuses short signing keys (config.py).
TEST_SECRET_KEY = "test-secret-key-of-the-test-suite-0123456789"

pytest_plugins = PLUGINS
# What starts a server process: harness's start_server (a gunicorn) and launch (any other
# server, e.g. moto_server for S3), conftest's server_with_account, and the Procfile's command
# run by hand.
SERVER_STARTERS = {"start_server", "server_with_account", "launch", "procfile_command"}


def starts_a_server(function):
    """Whether a test or fixture function calls one of SERVER_STARTERS itself."""
    code = getattr(function, "__code__", None)
    return code is not None and bool(SERVER_STARTERS & set(code.co_names))


def needs_a_server(item):
    """Whether the test, or a fixture it uses (directly or not), starts a server process."""
    fixtures = item._fixtureinfo.name2fixturedefs  # every fixture of the test, with its defs
    return starts_a_server(getattr(item, "function", None)) or any(
        starts_a_server(definition.func)
        for name in item.fixturenames for definition in fixtures.get(name, ()))


def pytest_collection_modifyitems(items):
    """Mark every test that needs a server process as slow (`-m "not slow"` leaves them
    out); whole end-to-end modules say `pytestmark = pytest.mark.slow` themselves, and a
    test that takes over a second by design says `@pytest.mark.slow`."""
    for item in items:
        if needs_a_server(item):
            item.add_marker(pytest.mark.slow)


@dataclass
class Account:
    """A user and a bearer token of theirs, ready to send."""

    user: User
    token: str

    @property
    def headers(self):
        return {"Authorization": f"Bearer {self.token}"}


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
                "SECRET_KEY": TEST_SECRET_KEY,
                **config,
            },
            instance_path=str(tmp_path / "instance"),
        )

    return make


@pytest.fixture
def app(make_app):
    """The app on a fresh database (SQLite, or PostgreSQL too in CI) and image folder."""
    return make_app()


@pytest.fixture
def job_threads():
    """Start this process's job threads (jobs.py) on an app when the test asks; they are
    stopped after it. No test has them otherwise: jobs run by jobs.run_due_jobs()."""
    started = []

    def start(app):
        jobs.start_job_threads(app)
        started.append(app)

    yield start
    if started:
        jobs.stop_job_threads(timeout=60)


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


def make_rows(account, count, prefix="img", start=None, namespace=None):
    """Insert image rows directly, one second apart, oldest first (listing reads rows only);
    in namespace, when given, whose owner they then belong to."""
    start = start or datetime(2024, 1, 1)
    owner = namespace.user_id if namespace is not None else account.user
    place = f"{account.user.id}" if namespace is None else f"{account.user.id}-n{namespace.id}"
    Image.insert_many([
        {"author": account.user, "user": owner, "namespace": namespace, "name": f"{prefix}{i}",
         "storage_key": f"{prefix}-{place}-{i}", "size": 1, "virtual_size": 1,
         "sha256": "0" * 64, "created_at": start + timedelta(seconds=i)}
        for i in range(count)
    ]).execute()


@contextlib.contextmanager
def server_with_account(folder, username, extra_env=None):
    """A gunicorn (the harness's) for the block, its `headers` a new account's bearer token."""
    server = start_server(folder, extra_env)
    try:
        server.headers = server.account(username)
        yield server
    finally:
        stop_server(server)


def http_call(server, method, path, headers=None, body=None):
    """One request to a live server on a connection of its own (so any worker may take
    it); returns (status, headers, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def read_answers(sock, count=1):
    """The first count HTTP answers on a raw socket, each (status, head, body); an answer
    that arrives in the same read as the one before it is kept for its turn."""
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data and (piece := sock.recv(65536)):
            data += piece
        head, _, data = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(data) < length and (piece := sock.recv(65536)):
            data += piece
        answers.append((int(head.split()[1]), head, data[:length]))
        data = data[length:]
    return answers


def read_answer(sock):
    """(status, head, body) of the HTTP answer on a raw socket."""
    return read_answers(sock)[0]


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


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A gunicorn started as the Procfile says, on a free port, for this test module."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    stop_server(server)
