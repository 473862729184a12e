"""Fixtures: an app on a temporary instance folder and database, users with tokens,
real qcow2 images made by qemu-img, and a real gunicorn for end-to-end tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from auth import issue_token, parse_scopes  # noqa: E402
from models import User  # noqa: E402

ALL_SCOPES = "image:read,write,delete"


@dataclass
class Account:
    """A user and a bearer token of theirs, ready to send."""

    user: User
    token: str

    @property
    def headers(self):
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def app(tmp_path):
    """The app on a fresh SQLite file and image folder."""
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'test.sqlite3'}",
            "STORAGE_URL": f"file://{tmp_path / 'images'}",
            "SECRET_KEY": "test-secret",
        },
        instance_path=str(tmp_path / "instance"),
    )
    yield app


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


@pytest.fixture
def store_files(app):
    """A function listing every file in the store, its temporary folder included."""
    root = app.extensions["storage"].root
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
