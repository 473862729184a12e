"""What a killed worker leaves behind is put right by the next process that starts:
temporary files, and keys whose file and row were being changed together (intents)."""

import os
import subprocess
import sys
import threading

import pytest
from conftest import store_folder, stored_path

from harness import run_flask
from models import Image
from queries import has_image_with_key, image_keys
from recovery import orphan_keys, recover
from staging import INTENT_SUFFIX, TEMP_SUFFIX


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leave(folder, name, data=b""):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_uploads_and_deletes_leave_no_intent(client, alice, upload, store_files):
    first = upload(alice, name="one")
    assert upload(alice, name="one").status_code == 400  # the name is taken: file removed
    assert client.delete(f"/images/{first.json['id']}", headers=alice.headers).status_code == 204
    upload(alice, name="two")
    assert [f for f in store_files() if not f.endswith(".qcow2")] == []
    assert len(store_files()) == 1


def test_a_file_whose_row_never_came_is_removed(app, dead_pid):
    """A worker killed between moving the file in and committing its row."""
    store = app.extensions["storage"]
    orphan = leave(store_folder(app), "deadbeef.qcow2", b"QFI\xfb")
    intent = leave(store.staging_folder, f"{dead_pid}-deadbeef{INTENT_SUFFIX}")
    with app.app_context():
        assert recover(store, has_image_with_key) == (0, 1)
    assert not os.path.exists(orphan)
    assert not os.path.exists(intent)


def test_a_file_whose_row_was_committed_is_kept(app, alice, upload, dead_pid):
    """A worker killed after the commit, before it dropped its intent."""
    upload(alice, name="kept")
    store = app.extensions["storage"]
    key = Image.get().storage_key
    intent = leave(store.staging_folder, f"{dead_pid}-{key}{INTENT_SUFFIX}")
    with app.app_context():
        assert recover(store, has_image_with_key) == (0, 0)
    assert os.path.exists(stored_path(app, key))
    assert not os.path.exists(intent)


def test_a_file_whose_row_was_deleted_is_removed(app, alice, upload, dead_pid):
    """A worker killed between deleting the row and unlinking the file."""
    upload(alice, name="gone")
    store = app.extensions["storage"]
    image = Image.get()
    leave(store.staging_folder, f"{dead_pid}-{image.storage_key}{INTENT_SUFFIX}")
    Image.delete().execute()
    with app.app_context():
        assert recover(store, has_image_with_key) == (0, 1)
    assert not os.path.exists(stored_path(app, image.storage_key))


def test_live_workers_keep_their_files_and_dead_ones_lose_them(app, dead_pid):
    store = app.extensions["storage"]
    live = os.getppid()  # a process that surely runs, and is not this one
    kept = [leave(store.staging_folder, f"{live}-a{TEMP_SUFFIX}"),
            leave(store.staging_folder, f"{live}-b{INTENT_SUFFIX}")]
    swept = [leave(store.staging_folder, f"{dead_pid}-c{TEMP_SUFFIX}"),
             leave(store.staging_folder, f"{os.getpid()}-d{TEMP_SUFFIX}"),  # an earlier self
             leave(store.staging_folder, "stray-file")]
    with app.app_context():
        assert recover(store, has_image_with_key) == (3, 0)
    assert all(os.path.exists(p) for p in kept)
    assert not any(os.path.exists(p) for p in swept)


def test_the_app_recovers_when_it_starts(app, dead_pid):
    """create_app runs the recovery, so every restarted worker puts things right."""
    from app import create_app

    store = app.extensions["storage"]
    orphan = leave(store_folder(app), "cafe.qcow2")
    leave(store.staging_folder, f"{dead_pid}-cafe{INTENT_SUFFIX}")
    leave(store.staging_folder, f"{dead_pid}-x{TEMP_SUFFIX}")
    create_app(dict(app.config), instance_path=app.instance_path)
    assert os.listdir(store.staging_folder) == []
    assert not os.path.exists(orphan)


class HeldUpload:
    """An upload on its own thread, held after put() moved its file in and left its intent,
    before its row is committed: as a live upload is while `flask sweep` runs."""

    def __init__(self, monkeypatch, store, upload, account):
        self.stored, self.go_on, self.result = threading.Event(), threading.Event(), {}
        real_put = store.put

        def put_then_wait(staged):
            key = real_put(staged)
            self.stored.set()
            assert self.go_on.wait(120), "the test never let the upload go on"
            return key

        monkeypatch.setattr(store, "put", put_then_wait)
        self.thread = threading.Thread(
            target=lambda: self.result.update(response=upload(account, name="held")))
        self.thread.start()
        assert self.stored.wait(120), "the upload never reached put()"

    def finish(self):
        """Let the upload commit; return its response."""
        self.go_on.set()
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.result["response"]


def sweep_command(app, *args):
    """`flask sweep` in a process of its own, as an admin runs it beside the service."""
    env = {**os.environ, "DATABASE_URL": app.config["DATABASE_URL"],
           "STORAGE_URL": app.config["STORAGE_URL"], "SECRET_KEY": app.config["SECRET_KEY"],
           "IMAGESTORE_INSTANCE": app.instance_path}
    return run_flask(env, "sweep", *args).stdout


def test_sweep_spares_a_live_upload_between_put_and_commit(
        app, client, alice, upload, qcow2_bytes, monkeypatch):
    """`sweep --min-age 0` removed the file of an upload that had not committed its row
    yet: the upload then answered 201 for an image whose file was gone."""
    held = HeldUpload(monkeypatch, app.extensions["storage"], upload, alice)
    try:
        output = sweep_command(app, "--min-age", "0")
    finally:
        response = held.finish()
    assert output.strip() == "removed 0 temporary files and 0 orphan files"
    assert response.status_code == 201
    got = client.get(f"/images/{response.json['id']}",
                     headers={**alice.headers, "Accept": "application/octet-stream"})
    assert got.status_code == 200 and got.data == qcow2_bytes


@pytest.mark.parametrize("commit_during", ["keys", "intended_keys"])
def test_a_row_committed_while_the_sweep_lists_keeps_its_file(
        app, alice, upload, monkeypatch, commit_during):
    """The upload commits while the sweep is between its listings: its file is no orphan."""
    store = app.extensions["storage"]
    held = HeldUpload(monkeypatch, store, upload, alice)
    lister = store.intents if commit_during == "intended_keys" else store
    real_listing = getattr(lister, commit_during)

    def listing_then_commit(*args, **kwargs):
        found = real_listing(*args, **kwargs)
        assert held.finish().status_code == 201
        return found

    monkeypatch.setattr(lister, commit_during, listing_then_commit)
    try:
        assert orphan_keys(store, older_than=0, keys_with_rows=image_keys) == []
    finally:
        held.finish()
    assert os.path.exists(stored_path(app, Image.get().storage_key))


def test_a_file_deleted_while_the_sweep_lists_keys_is_no_orphan(tmp_path):
    """A DELETE between the sweep's folder listing and its look at a file's age made
    `keys()` raise FileNotFoundError, and `flask sweep` failed."""
    from localstore import _changed_before

    (tmp_path / "gone.qcow2").write_bytes(b"x")
    (entry,) = list(os.scandir(tmp_path))
    (tmp_path / "gone.qcow2").unlink()
    assert _changed_before(entry, limit=float("inf")) is False
