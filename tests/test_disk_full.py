"""A full disk met anywhere, not only while the body is written, is a 507 in JSON; and a
full disk under the database and the store (a real tmpfs) still serves reads and deletes."""

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import sample_images
from conftest import ALL_SCOPES, TEST_SECRET_KEY, start_server, stop_server
from peewee import OperationalError

from app import create_app
from auth import issue_token, parse_scopes
from models import Image, User, db, keep_wal, release_connections
from staging import free_bytes


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    # as peewee wraps the driver's error
    OperationalError(sqlite3.OperationalError("database or disk is full"),
                     "database or disk is full"),
    OperationalError(sqlite3.OperationalError("database or disk is full")),
])
def test_a_full_disk_anywhere_is_507(app, client, error):
    def fail():
        raise error

    app.add_url_rule("/fail", "fail", fail)
    response = client.get("/fail")
    assert response.status_code == 507
    assert response.json == {"message": "Insufficient Storage: the image store is full"}


def test_other_os_errors_stay_500_without_details(app, client):
    def fail():
        raise OSError(errno.EACCES, "Permission denied", "/srv/secret/path")

    app.add_url_rule("/fail", "fail", fail)
    response = client.get("/fail")
    assert response.status_code == 500
    assert b"/srv" not in response.data


# --- a real small filesystem that fills up ----------------------------------------------

MIB = 1 << 20
DISK = {"Accept": "application/octet-stream"}
RESERVE = MIB  # MIN_FREE_SPACE in these tests: small beside the 16 MiB disks


@contextlib.contextmanager
def small_disk(folder, megabytes=16):
    """A tmpfs of that size mounted on folder for the block (root only, else skip)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (run the tests as root)")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder, leave=0):
    """Take the disk's free space with one file until only `leave` bytes are free."""
    with open(folder / "filler", "ab", buffering=0) as filler:
        with contextlib.suppress(OSError):  # ENOSPC: the disk is full
            os.posix_fallocate(filler.fileno(), 0, max(free_bytes(folder) - leave, 1))
        while leave == 0:  # whatever fallocate left, down to the last page
            try:
                filler.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
    assert free_bytes(folder) <= leave


@dataclass
class FullDiskApp:
    """An app whose database and store are on small disks of their own or one shared."""

    app: object
    client: object
    headers: dict
    database_disk: Path
    storage_disk: Path

    def upload(self, name, data):
        return self.client.post("/images", query_string={"name": name}, headers=self.headers,
                                data=data)

    def staged_files(self):
        return os.listdir(self.app.extensions["storage"].staging_folder)


def build_app(database_disk, storage_disk):
    """An app with its database on one disk and its store on another (or the same)."""
    app = create_app({"TESTING": True, "SECRET_KEY": TEST_SECRET_KEY,
                      "DATABASE_URL": f"sqlite:///{database_disk / 'imagestore.sqlite3'}",
                      "STORAGE_URL": f"file://{storage_disk / 'images'}",
                      "MIN_FREE_SPACE": RESERVE},
                     instance_path=str(database_disk / "instance"))
    user = User.create(username="alice", email="alice@example.com")
    headers = {"Authorization": f"Bearer {issue_token(user, parse_scopes(ALL_SCOPES))}"}
    db.close()  # as after every request: the app holds no connection of its own
    return FullDiskApp(app, app.test_client(), headers, database_disk, storage_disk)


@contextlib.contextmanager
def released(built):
    """Close every file the app holds on its disks, so that they can be unmounted."""
    try:
        yield built
    finally:
        release_connections()
        keep_wal(None)


@pytest.fixture
def one_disk(tmp_path):
    """An app with its database and store on one 16 MiB tmpfs."""
    with small_disk(tmp_path / "disk") as disk, released(build_app(disk, disk)) as built:
        yield built


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """A valid qcow2 of about 4 MiB: two of them fill a quarter of a small disk each."""
    folder = tmp_path_factory.mktemp("big")
    return sample_images.write_data(sample_images.good_v3(folder, size="8M"),
                                    (0, 4 * MIB)).read_bytes()


def test_reads_go_on_when_the_disk_is_full(one_disk, big_image):
    """SQLite removed its -wal and -shm files when the last request closed its connection,
    and could not write them again on the full disk: every read was a 500."""
    image = one_disk.upload("big", big_image).json
    fill(one_disk.database_disk)
    client, headers = one_disk.client, one_disk.headers
    listed = client.get("/images", headers=headers)
    assert listed.status_code == 200
    assert [i["id"] for i in listed.json] == [image["id"]]
    assert client.get(f"/images/{image['id']}", headers=headers).json == image
    download = client.get(f"/images/{image['id']}", headers={**headers, **DISK})
    assert (download.status_code, download.data) == (200, big_image)
    link = client.post(f"/images/{image['id']}/links", headers=headers)
    assert link.status_code == 201
    followed = client.get(link.json["url"].removeprefix("http://localhost"))
    assert (followed.status_code, followed.data) == (200, big_image)


def test_deletes_work_on_a_full_disk_and_make_room_for_uploads(one_disk, big_image,
                                                               qcow2_bytes):
    kept = one_disk.upload("kept", big_image).json
    doomed = one_disk.upload("doomed", big_image).json
    fill(one_disk.database_disk)
    assert one_disk.upload("refused", qcow2_bytes).status_code == 507
    deleted = one_disk.client.delete(f"/images/{doomed['id']}", headers=one_disk.headers)
    assert deleted.status_code == 204
    assert one_disk.client.get(f"/images/{doomed['id']}", headers=one_disk.headers) \
        .status_code == 404
    assert one_disk.upload("after", qcow2_bytes).status_code == 201
    listed = one_disk.client.get("/images", headers=one_disk.headers).json
    assert [i["name"] for i in listed] == ["after", "kept"]
    assert kept["id"] in [i["id"] for i in listed]


def test_an_upload_to_a_full_disk_is_507_and_leaves_nothing(one_disk, qcow2_bytes):
    fill(one_disk.database_disk)
    refused = one_disk.upload("refused", qcow2_bytes)
    assert (refused.status_code, refused.json) == (507, {
        "message": "Insufficient Storage: too little free space on the database and "
                   "storage disk"})
    assert one_disk.staged_files() == []
    assert Image.select().count() == 0


def test_an_upload_is_refused_while_less_than_the_reserve_is_free(one_disk, qcow2_bytes):
    """Uploads stop before they take the room that deletes need in the database."""
    fill(one_disk.database_disk, leave=RESERVE // 2)
    refused = one_disk.upload("refused", qcow2_bytes)
    assert refused.status_code == 507
    assert refused.json == {
        "message": "Insufficient Storage: too little free space on the database and "
                   "storage disk"}
    assert one_disk.staged_files() == []
    assert Image.select().count() == 0


def test_an_upload_that_would_eat_into_the_reserve_is_refused_before_reading(one_disk,
                                                                             big_image):
    fill(one_disk.database_disk, leave=len(big_image) + RESERVE // 2)
    assert one_disk.upload("refused", big_image).status_code == 507
    assert one_disk.staged_files() == []


@pytest.mark.parametrize(("full", "status"), [
    ("database", "database disk full"),
    ("storage", "storage disk full"),
    ("both", "database and storage disk full"),
])
def test_healthz_names_the_disk_that_is_full(tmp_path, full, status):
    with small_disk(tmp_path / "db") as db_disk, small_disk(tmp_path / "store") as store_disk, \
            released(build_app(db_disk, store_disk)) as built:
        assert built.client.get("/healthz").json == {"status": "ok"}
        for name, disk in (("database", db_disk), ("storage", store_disk)):
            if full in (name, "both"):
                fill(disk)
        health = built.client.get("/healthz")
        assert (health.status_code, health.json) == (503, {"status": status})


def test_healthz_names_both_parts_on_one_full_disk(one_disk):
    fill(one_disk.database_disk, leave=RESERVE // 2)
    health = one_disk.client.get("/healthz")
    assert (health.status_code, health.json) == (503, {"status": "database and storage disk full"})


def call(server, method, path, headers=None, data=None):
    """(status, parsed JSON or raw body) of one request to a live server."""
    request = urllib.request.Request(server.url + path, data=data, headers=headers or {},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    is_json = body.startswith((b"{", b"["))
    return status, json.loads(body) if is_json else body


def test_gunicorn_on_a_full_disk_serves_reads_and_deletes(tmp_path, big_image, qcow2_bytes):
    """The same under the real server: two workers, each request on a thread of its own."""
    with small_disk(tmp_path / "disk") as disk:
        server = start_server(disk / "instance", {"MIN_FREE_SPACE": str(RESERVE)})
        try:
            headers = server.account("alice")
            ids = [call(server, "POST", f"/images?name=i{n}", headers, big_image)[1]["id"]
                   for n in range(2)]
            fill(disk)
            status, listed = call(server, "GET", "/images", headers)
            assert status == 200
            assert sorted(i["id"] for i in listed) == sorted(ids)
            assert call(server, "GET", f"/images/{ids[0]}", {**headers, **DISK}) \
                == (200, big_image)
            status, refused = call(server, "POST", "/images?name=refused", headers, qcow2_bytes)
            assert status == 507 and set(refused) == {"message"}
            assert call(server, "GET", "/healthz") \
                == (503, {"status": "database and storage disk full"})
            assert call(server, "DELETE", f"/images/{ids[1]}", headers)[0] == 204
            assert call(server, "GET", "/healthz") == (200, {"status": "ok"})
            assert call(server, "POST", "/images?name=after", headers, qcow2_bytes)[0] == 201
            assert os.listdir(disk / "instance" / "images" / ".incoming") == []
        finally:
            stop_server(server)
