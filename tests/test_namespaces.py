"""Namespaces: path[@owner], auto-creation, owners and collaborators, visibility on the root."""


import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_list_pages import count_queries_of, statements_of

from errors import ValidationError
from models import Collaborator, Image, Namespace
from namespaces import MAX_DEPTH, NamespaceRef, _access_query, ensure_namespace, parse_namespace_ref

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
segments = st.lists(st.text(ALNUM, min_size=1, max_size=12), min_size=1, max_size=MAX_DEPTH)
usernames = st.text(ALNUM + "_.-", min_size=1, max_size=20)
# Text near the grammar, so that the fuzzing often lands close to a valid value.
namespace_like = st.text(ALNUM[:3] + ALNUM[-3:] + "/@_.-é ²\x00", max_size=30)


@pytest.mark.parametrize("text, segments, owner", [
    ("djinn", ("djinn",), None),
    ("a/b/c", ("a", "b", "c"), None),
    ("team@alice", ("team",), "alice"),
    ("/".join(["x"] * 20), ("x",) * 20, None),
])
def test_parse_valid_refs(text, segments, owner):
    ref = parse_namespace_ref(text)
    assert (ref.segments, ref.owner) == (segments, owner)


@pytest.mark.parametrize("text", ["", "a//b", "/a", "a/", "a-b", "a_b", "a b", "@alice",
                                  "a@", "a@b@c", "/".join(["x"] * 21), "ä"])
def test_parse_invalid_refs(text):
    with pytest.raises(ValidationError) as error:
        parse_namespace_ref(text)
    assert list(error.value.fields) == ["namespace"]


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


def test_upload_creates_missing_private_namespaces(alice, upload):
    image = upload(alice, namespace="djinn/ci/go").json
    ns = image["namespace"]
    assert ns["path"] == "djinn/ci/go" and ns["name"] == "go"
    assert ns["visibility"] == "private"
    assert ns["user_id"] == alice.user.id and ns["user"]["username"] == "alice"
    root = Namespace.get(Namespace.path == "djinn")
    assert ns["root_id"] == root.id and root.root_id == root.id
    assert ns["parent_id"] == Namespace.get(Namespace.path == "djinn/ci").id
    assert ns["url"].endswith("/n/alice/djinn/ci/go")
    assert ns["images_url"] == ns["url"] + "/-/images"
    assert image["namespace_id"] == ns["id"]


def test_own_namespace_by_explicit_owner(alice, upload):
    assert upload(alice, namespace="mine@alice").status_code == 201
    assert Namespace.get(Namespace.path == "mine").user_id == alice.user.id


def test_failed_upload_creates_no_namespace(alice, upload, store_files):
    response = upload(alice, namespace="newns", data=b"not an image")
    assert response.status_code == 400
    assert Namespace.select().count() == 0
    assert store_files() == []


def test_names_unique_within_a_namespace_not_across(alice, upload):
    assert upload(alice, name="img", namespace="a").status_code == 201
    assert upload(alice, name="img", namespace="b").status_code == 201
    assert upload(alice, name="img").status_code == 201
    again = upload(alice, name="img", namespace="a")
    assert again.status_code == 400 and again.json == {"name": ["Name already exists"]}


@pytest.fixture
def team(app, alice, bob):
    """alice's namespace team/sub, with bob as collaborator on the root."""
    ns = ensure_namespace(alice.user, ("team", "sub"))
    Collaborator.create(namespace=ns.root_id, user=bob.user)
    return ns


def test_someone_elses_namespace_needs_collaboration(make_account, alice, upload, team):
    carol = make_account("carol")
    response = upload(carol, namespace="team@alice")
    assert response.status_code == 400
    assert response.json == {"namespace": ["Namespace permission denied"]}


def test_missing_namespace_of_someone_else_is_not_created(make_account, alice, upload):
    carol = make_account("carol")
    for ref in ("nothere@alice", "x@nobody"):
        response = upload(carol, namespace=ref)
        assert response.json == {"namespace": ["Namespace permission denied"]}
    assert Namespace.select().count() == 0


def test_collaborator_uploads_into_child_of_root(client, alice, bob, upload, team):
    response = upload(bob, name="shared", namespace="team/sub@alice")
    assert response.status_code == 201
    image = response.json
    assert image["author_id"] == bob.user.id
    assert image["user_id"] == alice.user.id
    names = {i["name"] for i in client.get("/images", headers=alice.headers).json}
    assert "shared" in names
    names = {i["name"] for i in client.get("/images", headers=bob.headers).json}
    assert "shared" in names


def test_collaborator_cannot_create_new_paths_under_someone_else(bob, upload, team):
    response = upload(bob, namespace="team/new@alice")
    assert response.json == {"namespace": ["Namespace permission denied"]}


def test_collaborator_sees_gets_and_deletes(client, alice, bob, upload, team):
    image_id = upload(alice, name="x", namespace="team/sub").json["id"]
    assert client.get(f"/images/{image_id}", headers=bob.headers).status_code == 200
    assert client.delete(f"/images/{image_id}", headers=bob.headers).status_code == 204


@pytest.mark.parametrize("visibility, visible", [("private", False), ("internal", True),
                                                 ("public", True)])
def test_root_visibility_lets_others_get_but_not_list_or_delete(
        client, alice, make_account, upload, visibility, visible):
    root = ensure_namespace(alice.user, ("pub",), visibility)
    ensure_namespace(alice.user, ("pub", "child"))
    assert root.visibility == visibility
    image_id = upload(alice, namespace="pub/child").json["id"]
    carol = make_account("carol")
    got = client.get(f"/images/{image_id}", headers=carol.headers)
    assert got.status_code == (200 if visible else 404)
    assert client.get("/images", headers=carol.headers).json == []
    assert client.delete(f"/images/{image_id}", headers=carol.headers).status_code == 404
    assert Image.get_or_none(Image.id == image_id) is not None


def test_list_shows_namespaces_of_owner_and_collaborations_with_few_queries(
        client, alice, bob, upload, team):
    upload(alice, name="own")
    upload(alice, name="teamimg", namespace="team/sub")
    upload(bob, name="bobs")
    response, queries = count_queries_of(lambda: client.get("/images", headers=bob.headers))
    assert {i["name"] for i in response.json} == {"teamimg", "bobs"}
    assert response.json[1]["namespace"]["user"]["username"] == "alice"
    # The token with its user, the namespaces shared with bob, then one page with every
    # relation (the shared namespaces are walked one index each: docs/benchmarks.md).
    assert queries <= 3


@pytest.mark.parametrize("accept", ["application/json", "application/octet-stream"])
def test_an_image_in_a_shared_namespace_is_read_in_3_queries(client, alice, bob, upload,
                                                             team, accept):
    image_id = upload(alice, name="x", namespace="team/sub").json["id"]
    headers = {**bob.headers, "Accept": accept}
    response, queries = count_queries_of(lambda: client.get(f"/images/{image_id}",
                                                            headers=headers))
    assert response.status_code == 200
    response.close()
    # The token with its user, the image with its relations, then the namespace's root
    # and bob's collaboration on it (namespaces._access_query).
    assert queries == 3


def test_name_outside_namespaces_does_not_block_a_new_namespace(alice, upload):
    """The README's order: `alpine`, then `alpine` into a namespace that does not exist yet."""
    assert upload(alice, name="alpine").status_code == 201
    response = upload(alice, name="alpine", namespace="djinn")
    assert response.status_code == 201, response.json
    assert response.json["namespace"]["path"] == "djinn"
    again = upload(alice, name="alpine", namespace="djinn")
    assert again.json == {"name": ["Name already exists"]}


def test_a_collaborator_deletes_in_a_shared_namespace_after_one_access_query(
        client, alice, bob, upload, team):
    """Whoever may change an image may see it: the delete asks the namespace's root and
    bob's collaboration once (access.may_change), not once to see and once to change."""
    image_id = upload(alice, name="x", namespace="team/sub").json["id"]
    response, statements = statements_of(lambda: client.delete(f"/images/{image_id}",
                                                               headers=bob.headers))
    assert response.status_code == 204
    assert Image.get_or_none(Image.id == image_id) is None
    access_by_id, _ = _access_query(by_path=False).sql()
    assert statements.count(access_by_id) == 1
