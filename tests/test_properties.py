"""Hypothesis tests of the pure parts: namespace paths, scopes, the Link header, Accept
negotiation and the QCOW2 header reader. Each may refuse its input only in its own way."""

import struct
import subprocess
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qcow2
from auth import RESOURCES, format_scopes, parse_scopes
from downloads import DISK_TYPES, JSON, negotiate
from errors import ValidationError
from namespaces import MAX_DEPTH, NamespaceRef, parse_namespace_ref
from urls import link_header

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
segments = st.lists(st.text(ALNUM, min_size=1, max_size=12), min_size=1, max_size=MAX_DEPTH)
usernames = st.text(ALNUM + "_.-", min_size=1, max_size=20)
# What werkzeug hands the app from a query string: any text but lone surrogates.
query_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
# Text near the grammar, so that the fuzzing often lands close to a valid value.
namespace_like = st.text(ALNUM[:3] + ALNUM[-3:] + "/@_.-é ²\x00", max_size=30)


# --- namespaces.parse_namespace_ref ---

@given(st.one_of(st.text(max_size=40), namespace_like))
@example("")
@example("a//b")
@example("a@")
@example("/".join(["a"] * (MAX_DEPTH + 1)))
def test_namespace_parser_returns_a_ref_or_refuses_as_a_validation_error(text):
    try:
        ref = parse_namespace_ref(text)
    except ValidationError as error:
        assert list(error.fields) == ["namespace"]
        return
    assert isinstance(ref, NamespaceRef)
    assert 1 <= len(ref.segments) <= MAX_DEPTH
    assert all(s.isascii() and s.isalnum() for s in ref.segments)


@given(segments, st.one_of(st.none(), usernames))
def test_a_valid_namespace_path_parses_back_to_its_parts(parts, owner):
    text = "/".join(parts) + (f"@{owner}" if owner else "")
    ref = parse_namespace_ref(text)
    assert ref.segments == tuple(parts)
    assert ref.owner == owner
    assert ref.path == "/".join(parts)


# --- auth.parse_scopes / format_scopes ---

ALL_SCOPES = sorted(f"{res}:{perm}" for res, perms in RESOURCES.items() for perm in perms)
scope_text = st.text("image:readwritdl, ;", max_size=40)


@given(st.sets(st.sampled_from(ALL_SCOPES), min_size=1))
def test_scopes_survive_a_format_and_parse_roundtrip(scopes):
    assert parse_scopes(format_scopes(scopes)) == scopes


@given(st.lists(st.sampled_from(ALL_SCOPES), min_size=1))
def test_scopes_in_the_spaced_form_parse_too(scopes):
    assert parse_scopes(" ".join(scopes)) == set(scopes)


@given(st.one_of(st.none(), st.text(max_size=40), scope_text))
def test_the_scope_parser_returns_known_scopes_or_raises_value_error(text):
    try:
        scopes = parse_scopes(text)
    except ValueError:
        return
    assert scopes and scopes <= set(ALL_SCOPES)


# --- urls.link_header ---

BASE = "http://store.example/images"


def parse_link_header(value):
    """{rel: (url without query, [(key, value), ...])} from a Link header."""
    links = {}
    for part in value.split(", "):
        target, _, rel = part.partition(">; rel=")
        assert target.startswith("<") and rel in ('"prev"', '"next"')
        url = urlsplit(target[1:])
        links[rel.strip('"')] = (url._replace(query="").geturl(),
                                 parse_qsl(url.query, keep_blank_values=True))
    return links


@given(args=st.lists(st.tuples(st.one_of(st.just("page"), st.just("search"), query_text),
                               query_text), max_size=5),
       page=st.integers(1, 10**30), has_next=st.booleans())
def test_link_header_points_at_the_neighbour_pages_and_keeps_the_other_parameters(
        args, page, has_next):
    value = link_header(BASE, args, page, has_next)
    if page == 1 and not has_next:
        assert value is None
        return
    links = parse_link_header(value)
    assert set(links) == {rel for rel, present in (("prev", page > 1), ("next", has_next))
                          if present}
    kept = [(k, v) for k, v in args if k != "page"]
    for rel, number in (("prev", page - 1), ("next", page + 1)):
        if rel in links:
            url, query = links[rel]
            assert url == BASE
            assert query == [("page", str(number)), *kept]


# --- downloads.negotiate ---

media_type = st.sampled_from([JSON, *DISK_TYPES, "*/*", "application/*", "text/html",
                              "image/png", "application/x-qemu-disk+zip"])
quality = st.sampled_from(["", ";q=0", ";q=0.1", ";q=0.5", ";q=1", ";q=1.0", ";q=x", ";q=2"])
accept_header = st.lists(st.tuples(media_type, quality).map("".join), max_size=4).map(", ".join)


@given(st.one_of(st.none(), accept_header, st.text(max_size=40)))
@example("*/*")
@example("")
@example("   ")
def test_negotiation_picks_one_of_the_offers_or_none(header):
    chosen = negotiate(header)
    assert chosen is None or chosen in (JSON, *DISK_TYPES)


@pytest.mark.parametrize("header", [None, "", " ", "*/*", "application/*", "*/*;q=0.5"])
def test_no_preference_means_json(header):
    assert negotiate(header) == JSON


@given(st.sampled_from(DISK_TYPES), st.sampled_from(["", ";q=1", ";q=0.9"]))
def test_a_disk_type_asked_first_wins_over_a_weaker_json(disk, q):
    assert negotiate(f"{disk}{q}, {JSON};q=0.5") == disk


not_disk = st.sampled_from([JSON, "text/html", "image/png", "application/xml"])


@given(st.lists(st.tuples(not_disk, quality).map("".join), min_size=1, max_size=4)
       .map(", ".join))
def test_a_disk_type_is_never_chosen_when_the_client_did_not_allow_one(header):
    assert negotiate(header) in (None, JSON)


# --- qcow2.read_qcow2_header ---

read_qcow2_header = getattr(qcow2, "read_qcow2_header", None)
needs_reader = pytest.mark.skipif(read_qcow2_header is None,
                                  reason="qcow2.read_qcow2_header lands with branch inspect")
LIMIT = 1 << 40
HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    """The first bytes and sizes of real images: QCOW2 v3 and v2 (compat=0.10), plain,
    with a backing file, with extended L2, with another cluster size, with zstd."""
    folder = tmp_path_factory.mktemp("headers")
    variants = [(), ("-o", "compat=0.10"), ("-o", "cluster_size=4096"),
                ("-o", "extended_l2=on,cluster_size=65536"), ("-o", "compression_type=zstd"),
                ("-b", str(folder / "v0.qcow2"), "-F", "qcow2")]
    found = []
    for n, options in enumerate(variants):
        path = folder / f"v{n}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "16M"],
                       check=True)
        data = path.read_bytes()
        found.append((data[:HEADER_BYTES], len(data)))
    return found


def read_or_refuse(data, file_size, max_virtual_size=LIMIT):
    """Run the reader; it may return or refuse, nothing else."""
    try:
        return read_qcow2_header(data, file_size, max_virtual_size)
    except qcow2.ImageRefused as refusal:
        assert str(refusal)
        return None


@needs_reader
@given(data=st.binary(max_size=512), file_size=st.integers(0, 1 << 64))
@example(data=b"QFI\xfb", file_size=4)
@example(data=b"", file_size=0)
def test_the_header_reader_refuses_random_bytes_in_its_own_way(data, file_size):
    read_or_refuse(data, file_size)


@needs_reader
def test_the_header_reader_accepts_the_real_images(headers):
    accepted = [read_or_refuse(data, size) for data, size in headers]
    assert all(accepted[:-1]), "plain qemu-img images are refused"
    assert accepted[-1] is None, "an image with a backing file passed"


mutation = st.tuples(st.integers(0, HEADER_BYTES - 1), st.integers(0, 255))
field_overwrite = st.tuples(st.sampled_from(range(0, 112, 4)),
                            st.sampled_from([0, 1, 2, 3, 8, 9, 21, 22, 0x7FFFFFFF, 0xFFFFFFFF]))


@needs_reader
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(which=st.integers(0, 5), flips=st.lists(mutation, max_size=8),
       fields=st.lists(field_overwrite, max_size=4), cut=st.integers(0, HEADER_BYTES),
       size_change=st.integers(-(1 << 20), 1 << 20), max_virtual_size=st.integers(0, 1 << 62))
def test_the_header_reader_refuses_mutated_headers_in_its_own_way(
        headers, which, flips, fields, cut, size_change, max_virtual_size):
    data, file_size = headers[which]
    data = bytearray(data)
    for offset, byte in flips:
        data[offset] = byte
    for offset, value in fields:
        struct.pack_into(">I", data, offset, value)
    read_or_refuse(bytes(data[:cut]), max(0, file_size + size_change), max_virtual_size)
