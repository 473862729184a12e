"""Answers when another request changes an image between two steps of this one."""

import os

from conftest import stored_path

DISK = {"Accept": "application/octet-stream"}


def test_a_file_deleted_after_its_row_was_read_is_not_found(app, client, alice, upload):
    """A DELETE removes the row, then the file: a download that read the row just before
    finds no file. Found by reliability/run.py's load scenario as a 500."""
    image = upload(alice).json
    store = app.extensions["storage"]
    (key,) = store.keys()
    os.unlink(stored_path(app, key))
    response = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert response.status_code == 404
    assert response.json == {"message": "Not Found"}
