"""Hostile uploads through the API: each refused with its rule, and nothing left behind.

The images and the rule each must break are those of test_qcow2 (one list, in
image_fixtures.py, serves both); here they go through POST /images, and the store, its
temporary folder and the database must be exactly as before. Uploads that go wrong on the
wire, over a real gunicorn, are in test_e2e_uploads.py.
"""

import pytest
from image_fixtures import GOOD, HOSTILE

from models import Image, Namespace


@pytest.mark.parametrize("maker, expected, qemu, limit", HOSTILE)
def test_hostile_upload_is_refused_and_leaves_nothing(
        app, alice, upload, store_files, tmp_path, case_image, maker, expected, qemu, limit):
    app.config["MAX_VIRTUAL_SIZE"] = limit
    path = case_image(maker)
    response = upload(alice, name="hostile", namespace="new/ns", data=path.read_bytes())
    assert response.status_code == 400
    assert list(response.json) == ["file"]
    [message] = response.json["file"]
    assert message.startswith("File not a valid QCOW2 image: ")
    assert expected in message
    assert str(tmp_path) not in message and app.instance_path not in message
    assert store_files() == []
    assert Image.select().count() == 0 and Namespace.select().count() == 0


@pytest.mark.parametrize("maker, version, virtual_size, cluster_size", GOOD[:5])
def test_good_upload_is_stored(alice, upload, store_files, tmp_path, maker, version,
                               virtual_size, cluster_size):
    path = maker(tmp_path)
    response = upload(alice, name="good", data=path.read_bytes())
    assert response.status_code == 201, response.json
    assert response.json["virtual_size"] == virtual_size
    assert response.json["size"] == path.stat().st_size
    assert len(store_files()) == 1


def test_delete_failing_after_commit_leaves_an_orphan_that_sweep_removes(
        app, client, runner, alice, upload, store_files, monkeypatch):
    """Row first, file after: a failure between them leaves a file, never a row without one."""
    image_id = upload(alice).json["id"]
    storage = app.extensions["storage"]

    def failing_delete(key):
        raise OSError("disk went away")

    monkeypatch.setattr(storage, "delete", failing_delete)
    assert client.delete(f"/images/{image_id}", headers=alice.headers).status_code == 500
    assert Image.get_or_none(Image.id == image_id) is None
    # The file stays, and with it the delete's intent, which the next start also settles.
    assert [f.rsplit(".", 1)[1] for f in store_files()] == ["intent", "qcow2"]
    monkeypatch.undo()
    assert "1 orphan files" in runner.invoke(args=["sweep", "--min-age", "0"]).output
    assert store_files() == []
