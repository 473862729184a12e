"""Fixtures of the client's tests (tests/test_client*.py): one gunicorn for them all, the
`imagestore` command run as a user runs it (a subprocess, in a home folder of its own), a
LoopbackProxy in front of the server, and disk images with random data.

The command runs as `python -m imagestore_client` with this checkout's client/ first on
PYTHONPATH, so the tests try the code beside them even where the venv's editable install
(bin/setup) points at another checkout. A pytest plugin of conftest.py (its `pytest_plugins`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import ROOT, server_with_account
from loopback_proxy import LoopbackProxy

CLIENT = ROOT / "client"
MiB = 1 << 20


class Client:
    """The imagestore command of one user: their home (config, cache and state folders
    inside it) and environment (IMAGESTORE_URL and IMAGESTORE_TOKEN)."""

    def __init__(self, home, url, token):
        self.home = Path(home)
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("IMAGESTORE_", "XDG_"))}
        python_path = os.pathsep.join(filter(None, [str(CLIENT), env.get("PYTHONPATH")]))
        self.env = {**env, "PYTHONPATH": python_path, "HOME": str(self.home),
                    "IMAGESTORE_URL": url, "IMAGESTORE_TOKEN": token}

    @property
    def cache(self):
        """The default cache folder, ~/.cache/imagestore."""
        return self.home / ".cache" / "imagestore"

    def command(self, *args):
        return [sys.executable, "-m", "imagestore_client", *map(str, args)]

    def environment(self, env):
        """This user's environment with changes (a value of None removes the variable)."""
        merged = {**self.env, **env}
        return {name: value for name, value in merged.items() if value is not None}

    def __call__(self, *args, timeout=300, **env):
        """Run `imagestore ARGS` to its end; the CompletedProcess (text stdout/stderr)."""
        return subprocess.run(self.command(*args), env=self.environment(env), timeout=timeout,
                              capture_output=True, text=True, check=False)

    def start(self, *args, **env):
        """Start `imagestore ARGS` without waiting (Popen, text pipes)."""
        return subprocess.Popen(self.command(*args), env=self.environment(env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def client_server(tmp_path_factory):
    """A gunicorn for the client's tests; `alice_token` is a token of its user alice."""
    with server_with_account(tmp_path_factory.mktemp("client-server"), "alice") as server:
        server.alice_token = server.headers["Authorization"].removeprefix("Bearer ")
        yield server


@pytest.fixture
def proxy(client_server):
    """A LoopbackProxy in front of the test's server, for this test alone."""
    proxy = LoopbackProxy(client_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def imagestore(tmp_path, proxy, client_server):
    """The command, as alice, talking to the server through the proxy."""
    return Client(tmp_path / "home", proxy.url, client_server.alice_token)


def make_disk(folder, mib, name="disk.qcow2"):
    """A qcow2 holding mib MiB of random data (so its file is about that large)."""
    raw = Path(folder) / "disk.raw"
    raw.write_bytes(os.urandom(mib * MiB))
    path = Path(folder) / name
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    return path


def upload(server, path, name, namespace=None, token=None):
    """POST /images of a file, straight to the server (as alice, or the token's user); the
    image object."""
    params = {"name": name} | ({"namespace": namespace} if namespace else {})
    headers = {"Authorization": f"Bearer {token}"} if token else server.headers
    with open(path, "rb") as body:
        answer = requests.post(f"{server.url}/images", params=params, data=body,
                               headers=headers, timeout=120)
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.fixture(scope="session")
def pulled_image(client_server, tmp_path_factory):
    """A 24 MiB image of random data on the server: (image object, its file's bytes)."""
    path = make_disk(tmp_path_factory.mktemp("pulled"), 24)
    return upload(client_server, path, "pulled"), path.read_bytes()
