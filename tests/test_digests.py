"""Digests (API.md "Digests"): a POST /images may say the sha256 of its file, in a
`Repr-Digest: sha-256=:BASE64:` header (RFC 9530) or a `sha256=HEX` query, and a file that
does not have it is refused with nothing kept; every download says the file's digest back
in Repr-Digest, beside the ETag."""

import base64
import hashlib

import pytest

from digests import parse_repr_digest
from errors import ValidationError
from models import Image

DISK = {"Accept": "application/octet-stream"}


@pytest.fixture
def post(client, qcow2_bytes):
    """POST /images of the small image with extra headers."""
    return lambda account, headers, name="img": client.post(
        f"/images?name={name}", data=qcow2_bytes, headers={**account.headers, **headers})


def repr_digest(data, algorithm="sha-256"):
    digest = hashlib.new(algorithm.replace("-", ""), data).digest()
    return f"{algorithm}=:{base64.b64encode(digest).decode()}:"


# ----------------------------------------------------------------- uploads


def test_an_upload_with_its_digest_is_stored(post, alice, qcow2_bytes):
    answer = post(alice, {"Repr-Digest": repr_digest(qcow2_bytes)})
    assert answer.status_code == 201
    assert answer.json["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()


def test_an_upload_with_its_sha256_query_is_stored(client, alice, qcow2_bytes):
    sha256 = hashlib.sha256(qcow2_bytes).hexdigest()
    answer = client.post(f"/images?name=img&sha256={sha256.upper()}", data=qcow2_bytes,
                         headers=alice.headers)
    assert answer.status_code == 201


@pytest.mark.parametrize("how", ["header", "query"])
def test_a_file_that_is_not_the_one_announced_is_refused_and_nothing_kept(
        client, alice, store_files, qcow2_bytes, how):
    other = b"another file"
    said = hashlib.sha256(other).hexdigest()
    if how == "header":
        answer = client.post("/images?name=img", data=qcow2_bytes,
                             headers={**alice.headers, "Repr-Digest": repr_digest(other)})
    else:
        answer = client.post(f"/images?name=img&sha256={said}", data=qcow2_bytes,
                             headers=alice.headers)
    actual = hashlib.sha256(qcow2_bytes).hexdigest()
    assert (answer.status_code, answer.json) == (400, {"file": [
        f"sha256 mismatch: the file received has sha256 {actual}, the request said {said}"]})
    assert Image.select().count() == 0 and store_files() == []


@pytest.mark.parametrize("header", [
    "sha-256=abc",  # not a byte sequence
    "sha-256=:YWJj:",  # 3 bytes, not 32
    "sha-256=:not base64!:",
    "sha-256",  # no value
    "",
    "SHA-256=:AAAA:",  # keys are lowercase
])
def test_a_malformed_repr_digest_is_400_before_the_body(post, alice, store_files, header):
    answer = post(alice, {"Repr-Digest": header})
    assert answer.status_code == 400
    assert answer.json["Repr-Digest"][0].startswith("Repr-Digest malformed: ")
    assert store_files() == []


def test_a_malformed_sha256_query_is_400(client, alice, qcow2_bytes):
    answer = client.post("/images?name=img&sha256=xyz", data=qcow2_bytes, headers=alice.headers)
    assert (answer.status_code, answer.json) == (
        400, {"sha256": ["sha256 must be 64 hexadecimal digits"]})


def test_a_query_and_a_header_that_disagree_are_400(client, alice, qcow2_bytes):
    sha256 = hashlib.sha256(qcow2_bytes).hexdigest()
    answer = client.post(f"/images?name=img&sha256={sha256}", data=qcow2_bytes,
                         headers={**alice.headers, "Repr-Digest": repr_digest(b"other")})
    assert answer.status_code == 400 and "differ" in answer.json["sha256"][0]


def test_other_algorithms_are_ignored_and_sha_256_among_them_is_checked(post, alice,
                                                                       qcow2_bytes):
    only_512 = repr_digest(b"whatever", "sha-512")
    assert post(alice, {"Repr-Digest": only_512}, name="a").status_code == 201
    both = f"{only_512}, {repr_digest(b'not it')}"
    assert post(alice, {"Repr-Digest": both}, name="b").status_code == 400
    right = f"{repr_digest(qcow2_bytes, 'sha-512')}, {repr_digest(qcow2_bytes)}"
    assert post(alice, {"Repr-Digest": right}, name="c").status_code == 201


def test_the_digest_parser_reads_a_dictionary_with_parameters():
    digest = hashlib.sha256(b"x").digest()
    value = f"sha-512=:{base64.b64encode(bytes(64)).decode()}:;p=1, sha-256=:" \
            f"{base64.b64encode(digest).decode()}:"
    assert parse_repr_digest(value) == digest.hex()
    with pytest.raises(ValidationError):
        parse_repr_digest("sha-256=:AAAA:,")


# ----------------------------------------------------------------- downloads


@pytest.fixture
def image(upload, alice, qcow2_bytes):
    return upload(alice).json


def test_a_download_says_the_files_digest_beside_its_etag(client, alice, image, qcow2_bytes):
    answer = client.get(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert answer.headers["Repr-Digest"] == repr_digest(qcow2_bytes)
    assert answer.headers["ETag"] == f'"{hashlib.sha256(qcow2_bytes).hexdigest()}"'
    head = client.head(f"/images/{image['id']}", headers={**alice.headers, **DISK})
    assert head.headers["Repr-Digest"] == repr_digest(qcow2_bytes)


def test_a_range_and_a_304_carry_the_whole_files_digest(client, alice, image, qcow2_bytes):
    """RFC 9530: Repr-Digest is of the representation, whatever part of it is sent."""
    url = f"/images/{image['id']}"
    part = client.get(url, headers={**alice.headers, **DISK, "Range": "bytes=0-99"})
    assert part.status_code == 206 and part.headers["Repr-Digest"] == repr_digest(qcow2_bytes)
    etag = part.headers["ETag"]
    same = client.get(url, headers={**alice.headers, **DISK, "If-None-Match": etag})
    assert same.status_code == 304 and same.headers["Repr-Digest"] == repr_digest(qcow2_bytes)


def test_error_answers_and_json_carry_no_file_digest(client, alice, image, qcow2_bytes):
    url = f"/images/{image['id']}"
    beyond = client.get(url, headers={**alice.headers, **DISK,
                                      "Range": f"bytes={len(qcow2_bytes)}-"})
    assert beyond.status_code == 416 and "Repr-Digest" not in beyond.headers
    failed = client.get(url, headers={**alice.headers, **DISK, "If-Match": '"other"'})
    assert failed.status_code == 412 and "Repr-Digest" not in failed.headers
    assert "Repr-Digest" not in client.get(url, headers=alice.headers).headers


def test_a_signed_link_says_the_digest_too(client, alice, image, qcow2_bytes):
    link = client.post(f"/images/{image['id']}/links", headers=alice.headers).json["url"]
    answer = client.get(link.removeprefix("http://localhost"))
    assert answer.status_code == 200 and answer.headers["Repr-Digest"] == repr_digest(qcow2_bytes)
