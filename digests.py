"""Digests of whole files (API.md "Digests"): the sha256 a client says its upload has, from
`Repr-Digest` (RFC 9530) or a `sha256` query, checked against what arrived; and the
`Repr-Digest` that downloads carry."""

import base64
import binascii
import re

from errors import ValidationError

HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# One member of an RFC 8941 dictionary: a key, and an item (a byte sequence, for a digest)
# with parameters, which RFC 9530 does not use and which are ignored.
_MEMBER = re.compile(r"([a-z*][a-z0-9_\-.*]*)(?:=([^;]*))?((?:;[^;]*)*)")
_BYTES = re.compile(r":([A-Za-z0-9+/]*={0,2}):")
MISMATCH = "sha256 mismatch"


def parse_sha256_hex(text, field="sha256"):
    """A sha256 given as 64 hex digits, lowercased; ValidationError on field otherwise."""
    if not HEX_SHA256.fullmatch(text or ""):
        raise ValidationError(field, "sha256 must be 64 hexadecimal digits")
    return text.lower()


def parse_repr_digest(header):
    """The sha-256 of a Repr-Digest header, as hex; None when the header names only other
    algorithms (RFC 9530 lets a recipient ignore those). A header that is not a dictionary
    of digests, or a sha-256 that is not 32 bytes of base64, is a 400."""
    found = None
    for member in header.split(","):
        match = _MEMBER.fullmatch(member.strip())
        if match is None or match.group(2) is None:
            raise _malformed("not a dictionary like sha-256=:BASE64:")
        if match.group(1) == "sha-256":
            found = _sha256_bytes(match.group(2).strip()).hex()
    return found


def _sha256_bytes(item):
    """The 32 bytes of a sha-256 byte sequence (`:BASE64:`)."""
    match = _BYTES.fullmatch(item)
    try:
        digest = base64.b64decode(match.group(1), validate=True) if match else b""
    except binascii.Error:
        digest = b""
    if len(digest) != 32:
        raise _malformed("sha-256 must be the 32 bytes of the digest, base64 between colons")
    return digest


def _malformed(why):
    return ValidationError("Repr-Digest", f"Repr-Digest malformed: {why}")


def expected_sha256(header, query):
    """The sha256 a POST /images says its file has (None if it says none), from its
    Repr-Digest header and its sha256 query, which must agree when both are given."""
    from_header = parse_repr_digest(header) if header is not None else None
    from_query = parse_sha256_hex(query) if query is not None else None
    if from_header and from_query and from_header != from_query:
        raise ValidationError("sha256", "the sha256 query and the Repr-Digest header differ")
    return from_header or from_query


def check_sha256(expected, actual):
    """Refuse a file whose sha256 is not the one the client gave (if it gave one)."""
    if expected is not None and expected != actual:
        raise ValidationError(
            "file", f"{MISMATCH}: the file received has sha256 {actual}, "
                    f"the request said {expected}")


def repr_digest(sha256_hex):
    """The Repr-Digest field value for a file of this sha256 (hex)."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"
