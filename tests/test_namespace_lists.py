"""GET /n/:user/:path/-/images: the images of one namespace (not its children), as
GET /images pages them, for whoever may read the namespace; a namespace's `images_url`."""

import pytest
from conftest import make_rows
from test_list_pages import count_queries_of

from models import Collaborator, Image
from namespaces import ensure_namespace

ANONYMOUS = {}


def names(response):
    assert response.status_code == 200, response.json
    return [image["name"] for image in response.json]


@pytest.fixture
def team(app, alice, bob):
    """alice's private team and team/sub, bob a collaborator on the root."""
    sub = ensure_namespace(alice.user, ("team", "sub"))
    Collaborator.create(namespace=sub.root_id, user=bob.user)
    return sub.root, sub


def test_lists_the_namespace_alone_newest_first(client, alice, team):
    root, sub = team
    make_rows(alice, 3, prefix="root", namespace=root)
    make_rows(alice, 2, prefix="sub", namespace=sub)
    make_rows(alice, 2, prefix="outside")
    response = client.get("/n/alice/team/-/images", headers=alice.headers)
    assert names(response) == ["root2", "root1", "root0"]
    assert "Link" not in response.headers
    child = client.get("/n/alice/team/sub/-/images", headers=alice.headers)
    assert names(child) == ["sub1", "sub0"]
    assert {i["namespace"]["path"] for i in child.json} == {"team/sub"}


def test_images_url_of_a_namespace_is_its_list(client, alice, upload, team):
    image = upload(alice, name="go", namespace="team/sub").json
    images_url = image["namespace"]["images_url"]
    assert images_url == "http://localhost/n/alice/team/sub/-/images"
    listed = client.get(images_url.removeprefix("http://localhost"), headers=alice.headers)
    assert listed.json == [image]


def test_an_empty_namespace_is_an_empty_list(client, alice, team):
    response = client.get("/n/alice/team/-/images", headers=alice.headers)
    assert response.status_code == 200 and response.json == []
    assert "Link" not in response.headers


def test_exactly_25_is_one_page(client, alice, team):
    make_rows(alice, 25, namespace=team[0])
    response = client.get("/n/alice/team/-/images", headers=alice.headers)
    assert len(response.json) == 25 and "Link" not in response.headers


def test_26_make_a_second_page_with_absolute_links(client, alice, team):
    make_rows(alice, 26, namespace=team[1])
    first = client.get("/n/alice/team/sub/-/images", headers=alice.headers)
    assert names(first)[:2] == ["img25", "img24"] and len(first.json) == 25
    assert first.headers["Link"] == (
        '<http://localhost/n/alice/team/sub/-/images?page=2>; rel="next"')
    second = client.get("/n/alice/team/sub/-/images?page=2", headers=alice.headers)
    assert names(second) == ["img0"]
    assert second.headers["Link"] == (
        '<http://localhost/n/alice/team/sub/-/images?page=1>; rel="prev"')


def test_links_keep_search_and_use_the_public_url(app, client, alice, team):
    app.config["PUBLIC_URL"] = "https://images.example.com"
    make_rows(alice, 60, prefix="go", namespace=team[0])
    response = client.get("/n/alice/team/-/images?search=go&page=2", headers=alice.headers)
    assert len(response.json) == 25
    assert response.headers["Link"] == (
        '<https://images.example.com/n/alice/team/-/images?page=1&search=go>; rel="prev", '
        '<https://images.example.com/n/alice/team/-/images?page=3&search=go>; rel="next"')


@pytest.mark.parametrize("page", ["0", "-1", "abc", "", "1.5", "²"])
def test_bad_page_means_1(client, alice, team, page):
    make_rows(alice, 30, namespace=team[0])
    response = client.get(f"/n/alice/team/-/images?page={page}", headers=alice.headers)
    assert names(response)[0] == "img29"
    assert 'rel="prev"' not in response.headers["Link"]


def test_page_past_the_end_is_empty(client, alice, team):
    make_rows(alice, 3, namespace=team[0])
    response = client.get("/n/alice/team/-/images?page=4", headers=alice.headers)
    assert response.status_code == 200 and response.json == []
    assert response.headers["Link"].endswith('?page=3>; rel="prev"')


@pytest.mark.parametrize("search, expected", [
    ("_", {"a_b"}), ("%", {"100%"}), ("A_B", {"a_b"}), ("x", {"axb"}), ("zzz", set())])
def test_search_takes_percent_and_underscore_literally(client, alice, team, search, expected):
    for i, name in enumerate(["a_b", "axb", "100%", "1000"]):
        Image.create(author=alice.user, user=alice.user, namespace=team[0], name=name,
                     storage_key=f"k{i}", size=1, virtual_size=1, sha256="0" * 64)
        Image.create(author=alice.user, user=alice.user, namespace=team[1], name=name,
                     storage_key=f"child{i}", size=1, virtual_size=1, sha256="0" * 64)
    response = client.get("/n/alice/team/-/images", query_string={"search": search},
                          headers=alice.headers)
    assert set(names(response)) == expected


def test_search_with_a_nul_is_400(client, alice, team):
    response = client.get("/n/alice/team/-/images?search=a%00", headers=alice.headers)
    assert response.status_code == 400 and list(response.json) == ["search"]


# Who sees a namespace's list ---------------------------------------------------------------

# The root's visibility, then the answer to its owner, a collaborator on it, another user
# and a request without a token.
VISIBILITY = [("private", 200, 200, 404, 401),
              ("internal", 200, 200, 200, 401),
              ("public", 200, 200, 200, 200)]


@pytest.mark.parametrize("visibility, owner, collaborator, other, anonymous", VISIBILITY)
@pytest.mark.parametrize("path", ["root", "root/child"])
def test_the_list_is_seen_as_the_namespace_is(client, alice, bob, make_account, path,
                                              visibility, owner, collaborator, other,
                                              anonymous):
    root = ensure_namespace(alice.user, ("root",), visibility)
    child = ensure_namespace(alice.user, ("root", "child"))
    Collaborator.create(namespace=root, user=bob.user)
    make_rows(alice, 2, namespace=child if "/" in path else root)
    carol = make_account("carol")
    for who, status in [(alice, owner), (bob, collaborator), (carol, other),
                        (None, anonymous)]:
        headers = who.headers if who else ANONYMOUS
        response = client.get(f"/n/alice/{path}/-/images", headers=headers)
        assert response.status_code == status, (who and who.user.username, response.json)
        assert response.is_json
        if status == 200:
            assert names(response) == ["img1", "img0"]


def test_a_hidden_namespace_answers_as_one_that_does_not_exist(client, alice, make_account):
    """404 for a user, 401 without a token: the same bytes whether the namespace is
    private or missing, so that nobody learns which namespaces exist."""
    ensure_namespace(alice.user, ("secret",))
    ensure_namespace(alice.user, ("inside",), "internal")
    carol = make_account("carol")
    for headers, status in [(carol.headers, 404), (ANONYMOUS, 401)]:
        answers = [client.get(path, headers=headers) for path in (
            "/n/alice/secret/-/images", "/n/alice/nothere/-/images", "/n/nobody/x/-/images")]
        if status == 401:  # an internal one too, without a token
            answers.append(client.get("/n/alice/inside/-/images"))
        assert {(a.status_code, a.get_data(), tuple(a.headers)) for a in answers} == {
            (answers[0].status_code, answers[0].get_data(), tuple(answers[0].headers))}
        assert answers[0].status_code == status


@pytest.mark.parametrize("path", ["a-b", "x" * 33, "a%00b", "/".join(["x"] * 21),
                                  "team@alice", "a//b"])
def test_a_path_no_namespace_can_have_is_not_found(client, alice, team, path):
    response = client.get(f"/n/alice/{path}/-/images", headers=alice.headers)
    assert response.status_code == 404 and response.json == {"message": "Not Found"}


def test_a_username_no_user_can_have_is_not_found(client, alice, team):
    for username in ("al%00ice", "a" * 65, "al ice"):
        response = client.get(f"/n/{username}/team/-/images", headers=alice.headers)
        assert response.status_code == 404


def test_a_token_that_is_sent_is_checked_even_for_a_public_namespace(
        client, alice, make_account):
    ensure_namespace(alice.user, ("pub",), "public")
    bad = client.get("/n/alice/pub/-/images", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json == {"message": "Invalid token"}
    writer = make_account("writer", "image:write")
    refused = client.get("/n/alice/pub/-/images", headers=writer.headers)
    assert refused.status_code == 403
    assert refused.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", scope="image:read"')


def test_a_page_runs_at_most_3_queries_and_2_without_a_token(client, alice, bob, team):
    make_rows(alice, 30, namespace=team[1])
    ensure_namespace(alice.user, ("pub",), "public")
    make_rows(alice, 30, prefix="pub", namespace=ensure_namespace(alice.user, ("pub", "x")))
    response, queries = count_queries_of(
        lambda: client.get("/n/alice/team/sub/-/images?page=2", headers=bob.headers))
    assert len(response.json) == 5 and queries <= 3  # the token, the namespace, the page
    response, queries = count_queries_of(lambda: client.get("/n/alice/pub/x/-/images"))
    assert len(response.json) == 25 and queries <= 2
