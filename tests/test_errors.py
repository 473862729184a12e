"""Every error is JSON, 404 and 405 included; a 500 shows no trace."""

import pytest
from conftest import free_port

from models import open_database, release_connections


def test_unknown_route_is_json_404(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.content_type == "application/json"
    assert response.json == {"message": "Not Found"}


def test_non_numeric_image_id_is_json_404(client, alice):
    response = client.get("/images/abc", headers=alice.headers)
    assert response.status_code == 404 and response.json == {"message": "Not Found"}


@pytest.mark.parametrize("method, path", [("put", "/images"), ("patch", "/images/1"),
                                          ("post", "/healthz")])
def test_wrong_method_is_json_405_with_allow(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response.content_type == "application/json"
    assert response.json == {"message": "Method Not Allowed"}
    assert "GET" in response.headers["Allow"]


def test_unexpected_error_is_json_500_without_trace(app, client, alice, monkeypatch):
    import queries

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/imagestore/images.py")

    monkeypatch.setattr(queries, "list_images", broken)
    response = client.get("/images", headers=alice.headers)
    assert response.status_code == 500
    assert response.json == {"message": "Internal Server Error"}
    assert b"secret" not in response.data and b"Traceback" not in response.data


def test_healthz_needs_no_token(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}


def test_healthz_reports_unwritable_store(app, client):
    import os
    import stat
    folder = app.extensions["storage"].staging_folder
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root ignores modes: take the folder away instead
            os.rename(folder, folder + ".gone")
            response = client.get("/healthz")
            os.rename(folder + ".gone", folder)
        else:
            response = client.get("/healthz")
    finally:
        os.chmod(folder, stat.S_IRWXU)
    assert response.status_code == 503
    assert response.json == {"status": "storage not writable"}


def test_healthz_reports_database_failure(app, client, tmp_path):
    if app.config["DATABASE_URL"].startswith("postgres"):
        # A PostgreSQL that nobody runs: a free port.
        open_database(f"postgresql://postgres@127.0.0.1:{free_port()}/gone")
    else:
        # A database file that can no longer be opened: its path is now a folder.
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"test.sqlite3{suffix}").unlink(missing_ok=True)
        (tmp_path / "test.sqlite3").mkdir()
        release_connections()  # the pool's open ones would still read the unlinked file
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json == {"status": "database unavailable"}
