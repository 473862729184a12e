"""A store that is down (its folder gone, or read-only) is 503 naming the store, never a
500, a 404 for an image that exists, or a server path in the answer."""

import contextlib
import os
import subprocess

import pytest
from conftest import store_folder

from models import Image

DISK = {"Accept": "application/octet-stream"}
MISSING = {"message": "Image store unavailable: the image store (file storage) is missing"}
READ_ONLY = {"message": "Image store unavailable: the image store (file storage) is not writable"}


@pytest.fixture
def store_root(app):
    return store_folder(app)


@contextlib.contextmanager
def moved_away(folder):
    """The folder renamed away for the block, as when the disk under it is not mounted."""
    os.rename(folder, folder + ".away")
    try:
        yield
    finally:
        os.rename(folder + ".away", folder)


@contextlib.contextmanager
def read_only(folder):
    """The folder bind-mounted read-only onto itself for the block (root only: file modes
    do not stop root, a read-only mount does)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount the store read-only (run the tests as root)")
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def assert_unavailable(response, body, store_root):
    assert (response.status_code, response.json) == (503, body)
    assert response.headers["Retry-After"] == "30"
    assert os.path.dirname(store_root).encode() not in response.data


def test_an_upload_to_a_missing_store_is_503(client, alice, upload, store_root):
    with moved_away(store_root):
        response = upload(alice)
        assert not os.path.exists(store_root)  # not made again on the mount point
    assert_unavailable(response, MISSING, store_root)
    assert Image.select().count() == 0
    assert client.get("/images", headers=alice.headers).json == []


def test_a_delete_in_a_missing_store_is_503_and_keeps_the_image(client, alice, upload,
                                                                store_root, qcow2_bytes):
    image = upload(alice).json
    with moved_away(store_root):
        response = client.delete(f"/images/{image['id']}", headers=alice.headers)
    assert_unavailable(response, MISSING, store_root)
    kept = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert (kept.status_code, kept.data) == (200, qcow2_bytes)
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204


def test_a_download_from_a_missing_store_is_503_not_404(client, alice, upload, store_root):
    """A 404 would tell the client that the image is gone for good; it is not."""
    image = upload(alice).json
    link = client.post(f"/images/{image['id']}/links", headers=alice.headers).json["url"]
    with moved_away(store_root):
        download = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
        followed = client.get(link.removeprefix("http://localhost"))
        as_json = client.get(f"/images/{image['id']}", headers=alice.headers)
    assert_unavailable(download, MISSING, store_root)
    assert_unavailable(followed, MISSING, store_root)
    assert as_json.status_code == 200  # the row needs no store


def test_an_upload_to_a_read_only_store_is_503_and_leaves_nothing(app, client, alice, upload,
                                                                  store_root):
    with read_only(store_root):
        response = upload(alice)
        health = client.get("/healthz")
    assert_unavailable(response, READ_ONLY, store_root)
    assert (health.status_code, health.json) == (503, {"status": "storage not writable"})
    assert Image.select().count() == 0
    assert os.listdir(app.extensions["storage"].staging_folder) == []


def test_a_delete_in_a_read_only_store_is_503_and_keeps_the_image(client, alice, upload,
                                                                  store_root, qcow2_bytes):
    image = upload(alice).json
    with read_only(store_root):
        response = client.delete(f"/images/{image['id']}", headers=alice.headers)
        with client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK}) as got:
            readable = (got.status_code, got.data)  # closed after: the mount is not busy
    assert_unavailable(response, READ_ONLY, store_root)
    assert readable == (200, qcow2_bytes)  # reads go on
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204
