"""Settings read at start: the signing key (made whole or not at all, refused when short)
and the instance folder."""

import subprocess
import sys

import pytest
from conftest import ROOT

from app import create_app
from config import MIN_SECRET_KEY_LENGTH, ConfigError, load_config

# Prints the key that load_config settles on for an instance folder (argv[1]), once told to
# go on by a line on its stdin, so that several can be started together.
KEY_READER = r"""
import sys

from config import load_config

print("IMPORTED", flush=True)
sys.stdin.readline()
print(load_config(sys.argv[1], environ={})["SECRET_KEY"], flush=True)
"""

# load_config where no file may grow past 10 bytes (as on a disk that fills up mid-write).
FULL_DISK_WRITER = r"""
import resource
import signal
import sys

from config import load_config

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (10, 10))
try:
    load_config(sys.argv[1], environ={})
except Exception as error:
    sys.exit(str(error))
"""


def flask(env_extra, *args, cwd=ROOT):
    """Run the app's `flask` CLI in a child process."""
    env = {"PATH": "/usr/bin:/bin", **env_extra}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_key_is_made_once_and_kept(tmp_path):
    first = load_config(str(tmp_path), environ={})["SECRET_KEY"]
    assert len(first) >= MIN_SECRET_KEY_LENGTH
    assert (tmp_path / "secret_key").read_text() == first
    assert load_config(str(tmp_path), environ={})["SECRET_KEY"] == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


@pytest.mark.parametrize("content", ["", "\n", "short-key"])
def test_an_empty_or_short_key_file_is_refused(tmp_path, content):
    (tmp_path / "secret_key").write_text(content)
    with pytest.raises(ConfigError, match=r"secret_key (is empty|has only 9 characters);"):
        load_config(str(tmp_path), environ={})
    assert (tmp_path / "secret_key").read_text() == content  # left for the operator to see


def test_the_cli_refuses_an_empty_key_file_with_one_line(tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "secret_key").write_text("")
    result = flask({"IMAGESTORE_INSTANCE": str(instance)}, "init-db")
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {instance / 'secret_key'} is empty;")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("key", ["", " " * 40, "x" * (MIN_SECRET_KEY_LENGTH - 1)])
def test_a_short_secret_key_variable_is_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=r"SECRET_KEY (is empty|has only 31 characters);"):
        load_config(str(tmp_path), environ={"SECRET_KEY": key})
    assert not (tmp_path / "secret_key").exists()


def test_a_long_enough_secret_key_variable_is_taken(tmp_path):
    key = "k" * MIN_SECRET_KEY_LENGTH
    assert load_config(str(tmp_path), environ={"SECRET_KEY": key})["SECRET_KEY"] == key


def test_first_starts_at_once_all_take_one_key(tmp_path):
    """Eight processes make the key of a new instance folder at the same moment."""
    readers = [subprocess.Popen([sys.executable, "-c", KEY_READER, str(tmp_path)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(8)]
    for reader in readers:
        assert reader.stdout.readline() == "IMPORTED\n"
    for reader in readers:
        reader.stdin.write("go\n")
        reader.stdin.flush()
    keys = {reader.communicate(timeout=120)[0].strip() for reader in readers}
    assert all(reader.returncode == 0 for reader in readers)
    assert keys == {(tmp_path / "secret_key").read_text()}
    assert len(keys.pop()) >= MIN_SECRET_KEY_LENGTH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


def test_a_failed_write_leaves_no_key_behind(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert list(tmp_path.iterdir()) == []  # neither the key nor a temporary file
    assert result.returncode == 1
    assert result.stderr.startswith(f"could not write a new secret key to {tmp_path}")


def test_a_relative_instance_folder_is_taken_from_the_current_directory(tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGESTORE_INSTANCE", "inst")
    for name in ("DATABASE_URL", "STORAGE_URL", "SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    app = create_app({"TESTING": True})
    assert app.instance_path == str(tmp_path / "inst")
    assert app.config["DATABASE_URL"] == f"sqlite:///{tmp_path / 'inst' / 'imagestore.sqlite3'}"
    assert (tmp_path / "inst" / "secret_key").exists()


def test_the_cli_takes_a_relative_instance_folder(tmp_path):
    result = flask({"IMAGESTORE_INSTANCE": "inst", "PYTHONPATH": str(ROOT)}, "init-db",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "inst" / "imagestore.sqlite3").exists()
