"""A full disk met anywhere, not only while the body is written, is a 507 in JSON."""

import errno
import sqlite3

import pytest
from peewee import OperationalError


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
