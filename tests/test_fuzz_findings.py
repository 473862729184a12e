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


def test_a_page_past_64_bits_is_past_the_end(client, alice, upload):
    assert upload(alice).status_code == 201
    response = client.get("/images?page=11625460170010283709825024", headers=alice.headers)
    assert response.status_code == 200
    assert response.json == []
    assert response.headers["Link"].endswith('?page=11625460170010283709825023>; rel="prev"')


def test_a_superscript_digit_page_means_page_one(client, alice, upload):
    """str.isdigit() is true for '²', which int() refuses."""
    assert upload(alice).status_code == 201
    response = client.get("/images?page=²", headers=alice.headers)
    assert response.status_code == 200
    assert len(response.json) == 1


def test_a_superscript_digit_expires_in_is_a_validation_error(client, alice, upload):
    image_id = upload(alice).json["id"]
    response = client.post(f"/images/{image_id}/links?expires_in=²", headers=alice.headers)
    assert response.status_code == 400
    assert list(response.json) == ["expires_in"]
