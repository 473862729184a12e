"""The client's rules that need no server, called in this process: where its settings come
from, which push an interrupted one resumes, how a server's error reads, and which image a
name means."""

import sys

import pytest
from client_fixtures import CLIENT

sys.path.insert(0, str(CLIENT))

from imagestore_client.config import load_config
from imagestore_client.errors import ServerError, UsageError
from imagestore_client.push import SavedUpload, encode_metadata
from imagestore_client.server import in_namespace


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_environment_wins_over_the_file_and_the_file_over_defaults(home):
    write(home / ".config/imagestore/config.toml",
          'url = "https://file.example/"\ntoken = "from-file"\nretries = 2\n')
    from_file = load_config({})
    assert (from_file.url, from_file.token, from_file.retries) == (
        "https://file.example", "from-file", 2)
    assert from_file.cache == home / ".cache/imagestore"
    assert from_file.state == home / ".local/state/imagestore"
    mixed = load_config({"IMAGESTORE_URL": "http://env.example", "IMAGESTORE_CACHE": "/c"})
    assert (mixed.url, mixed.token, str(mixed.cache)) == ("http://env.example", "from-file", "/c")


def test_xdg_folders_and_imagestore_config_are_honoured(home):
    config = write(home / "elsewhere.toml", 'url = "http://x"\n')
    settings = load_config({"IMAGESTORE_CONFIG": str(config), "XDG_CACHE_HOME": "/xc",
                            "XDG_STATE_HOME": "/xs", "XDG_CONFIG_HOME": "relative/ignored"})
    assert (settings.url, str(settings.cache), str(settings.state)) == (
        "http://x", "/xc/imagestore", "/xs/imagestore")


def test_a_setting_of_the_wrong_type_is_a_usage_error(home):
    path = write(home / ".config/imagestore/config.toml", 'url = "http://x"\nretries = "8"\n')
    with pytest.raises(UsageError, match=f"^{path}: retries must be a int$"):
        load_config({})


def test_a_server_url_must_be_http_or_https(home):
    with pytest.raises(UsageError, match=r"^the server's URL must start with http:// or "
                                         r"https://: 'localhost:8000' \(from IMAGESTORE_URL\)$"):
        load_config({"IMAGESTORE_URL": "localhost:8000"})


def test_a_changed_file_is_a_new_push_and_the_same_one_resumes(tmp_path):
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"one")
    first = SavedUpload(tmp_path, "http://s", disk, disk.stat(), "img", None).path
    assert SavedUpload(tmp_path, "http://s", disk, disk.stat(), "img", None).path == first
    assert SavedUpload(tmp_path, "http://s", disk, disk.stat(), "other", None).path != first
    assert SavedUpload(tmp_path, "http://t", disk, disk.stat(), "img", None).path != first
    disk.write_bytes(b"two, longer")
    assert SavedUpload(tmp_path, "http://s", disk, disk.stat(), "img", None).path != first


def test_upload_metadata_is_base64_as_tus_says():
    assert encode_metadata({"name": "alpine", "namespace": None, "sha256": "ab"}) == (
        "name YWxwaW5l,sha256 YWI=")


def test_a_server_error_reads_as_one_line():
    assert str(ServerError(404, {"message": "Not Found"})) == "404 Not Found"
    assert str(ServerError(400, {"name": ["Name already exists"], "file": ["a", "b"]})) == (
        "400 Bad Request: name: Name already exists; file: a b")
    assert str(ServerError(460, {"message": "Checksum Mismatch: the piece's sha256 …"})) == (
        "460 Checksum Mismatch: Checksum Mismatch: the piece's sha256 …")
    assert ServerError(410).exit_code == 4 and ServerError(403).exit_code == 1


def test_a_name_means_the_image_in_that_namespace_and_no_other():
    team = {"path": "team", "user": {"username": "alice"}}
    assert in_namespace({"namespace": None}, None)
    assert not in_namespace({"namespace": team}, None)
    assert in_namespace({"namespace": team}, "team")
    assert in_namespace({"namespace": team}, "team@alice")
    assert not in_namespace({"namespace": team}, "team@bob")
    assert not in_namespace({"namespace": team}, "team/sub")
