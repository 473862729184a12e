"""Input at and past the sizes the database holds, digits that str.isdigit() takes and int()
does not, and bytes that SQL strings cannot hold: a clean 400 (for a page, an empty page or
page 1; for an image id, a 404), the same on SQLite and PostgreSQL, never a 500. Several were
found by schemathesis (tests/test_fuzz.py) and are kept here as plain tests."""

import pytest
from conftest import make_rows

from models import Image, Namespace


def test_namespace_segment_of_32_characters_is_accepted(alice, upload):
    response = upload(alice, namespace="a" * 32 + "/" + "b" * 32)
    assert response.status_code == 201, response.json
    assert response.json["namespace"]["name"] == "b" * 32


@pytest.mark.parametrize("namespace", ["a" * 33, "ok/" + "b" * 33, "c" * 1000],
                         ids=["33", "child-33", "1000"])
def test_namespace_segment_over_32_characters_is_400(alice, upload, store_files, namespace):
    response = upload(alice, namespace=namespace)
    assert response.status_code == 400
    assert list(response.json) == ["namespace"]
    assert "32" in response.json["namespace"][0]
    assert Namespace.select().count() == 0 and Image.select().count() == 0
    assert store_files() == []


def test_owner_over_64_characters_is_400(alice, upload):
    response = upload(alice, namespace="team@" + "o" * 65)
    assert response.status_code == 400
    assert list(response.json) == ["namespace"]
    assert "64" in response.json["namespace"][0]


@pytest.mark.parametrize("search", ["\x00", "go\x00", "\x00anything"],
                         ids=["nul", "go-nul", "nul-anything"])
def test_nul_in_search_is_400(client, alice, search):
    """PostgreSQL refuses a NUL in a string (a 500 before); SQLite cut the pattern there."""
    make_rows(alice, 3)
    response = client.get("/images", query_string={"search": search}, headers=alice.headers)
    assert response.status_code == 400
    assert list(response.json) == ["search"]


@pytest.mark.parametrize("page", [
    "368934881474191032",  # offset and offset + a page both fit in 64 bits
    "368934881474191033",  # its offset fits in 64 bits, offset + a page does not
    "9223372036854775808", "9" * 40, "9" * 5000, "0" * 5000 + "7"],
    ids=["offset-fits", "offset-fits-limit-not", "2**63", "40-digits", "5000-digits",
         "zeros-then-7"])
def test_huge_page_is_past_the_end(client, alice, page):
    make_rows(alice, 3)
    response = client.get("/images", query_string={"page": page}, headers=alice.headers)
    assert response.status_code == 200
    assert response.json == []
    digits = page.lstrip("0")
    before = "9" * 4299 + "8" if len(digits) > 4300 else str(int(digits) - 1)
    assert response.headers["Link"] == f'<http://localhost/images?page={before}>; rel="prev"'


def test_leading_zeros_do_not_make_a_page_huge(client, alice):
    make_rows(alice, 30)
    response = client.get("/images", query_string={"page": "0" * 5000 + "2"},
                          headers=alice.headers)
    assert [i["name"] for i in response.json] == ["img4", "img3", "img2", "img1", "img0"]
    assert response.headers["Link"] == '<http://localhost/images?page=1>; rel="prev"'


HUGE_ID = 22972117898849357824  # past 64 bits: SQLite cannot even bind it


@pytest.mark.parametrize("method, path", [
    ("GET", f"/images/{HUGE_ID}"),
    ("HEAD", f"/images/{HUGE_ID}"),
    ("DELETE", f"/images/{HUGE_ID}"),
    ("POST", f"/images/{HUGE_ID}/links"),
    ("GET", f"/images/{1 << 63}"),
])
def test_an_id_past_64_bits_is_not_found(client, alice, method, path):
    """An image id the database cannot hold is an image that is not there, on every route
    that takes one (schemathesis found it answered wrongly)."""
    response = client.open(path, method=method, headers=alice.headers)
    assert response.status_code == 404
    if method != "HEAD":
        assert response.json == {"message": "Not Found"}


def test_a_page_past_64_bits_is_past_the_end(client, alice, upload):
    """A page number past 64 bits is an empty page with a link back (found by schemathesis).
    """
    assert upload(alice).status_code == 201
    response = client.get("/images?page=11625460170010283709825024", headers=alice.headers)
    assert response.status_code == 200
    assert response.json == []
    assert response.headers["Link"].endswith('?page=11625460170010283709825023>; rel="prev"')


def test_a_superscript_digit_page_means_page_one(client, alice, upload):
    """str.isdigit() is true for '²', which int() refuses: such a page is a bad page, which
    means page 1, not a 500 (found by schemathesis)."""
    assert upload(alice).status_code == 201
    response = client.get("/images?page=²", headers=alice.headers)
    assert response.status_code == 200
    assert len(response.json) == 1


def test_a_superscript_digit_expires_in_is_a_validation_error(client, alice, upload):
    """The same '²' as a link's expires_in is a field error on expires_in, not a 500 (found
    by schemathesis)."""
    image_id = upload(alice).json["id"]
    response = client.post(f"/images/{image_id}/links?expires_in=²", headers=alice.headers)
    assert response.status_code == 400
    assert list(response.json) == ["expires_in"]
