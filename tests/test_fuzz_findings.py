"""Requests that schemathesis found answered wrongly, kept as plain regression tests."""

import pytest

HUGE_ID = 22972117898849357824  # past 64 bits: SQLite cannot even bind it


@pytest.mark.parametrize("method, path", [
    ("GET", f"/images/{HUGE_ID}"),
    ("HEAD", f"/images/{HUGE_ID}"),
    ("DELETE", f"/images/{HUGE_ID}"),
    ("POST", f"/images/{HUGE_ID}/links"),
    ("GET", f"/images/{1 << 63}"),
])
def test_an_id_past_64_bits_is_not_found(client, alice, method, path):
    response = client.open(path, method=method, headers=alice.headers)
    assert response.status_code == 404
    if method != "HEAD":
        assert response.json == {"message": "Not Found"}
