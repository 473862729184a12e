"""GET /images?name=&namespace=: exact filters beside search, so that a client finds "the
`alpine` image of `djinn`" in one request. They narrow what the user may list, and never
widen it."""

import pytest
from conftest import make_rows
from test_list_pages import count_queries_of

from access import NAME_FILTER
from models import Collaborator, Image
from namespaces import ensure_namespace


def listed(client, account, **query):
    """The names GET /images answers with the query, checking it is a 200."""
    response = client.get("/images", query_string=query, headers=account.headers)
    assert response.status_code == 200, response.json
    return [image["name"] for image in response.json]


def add(account, name, namespace=None):
    """One image row named name, in namespace (owned by its owner) or outside namespaces."""
    owner = namespace.user_id if namespace is not None else account.user
    return Image.create(author=account.user, user=owner, namespace=namespace, name=name,
                        storage_key=f"key-{Image.select().count()}", size=1, virtual_size=1,
                        sha256="0" * 64)


@pytest.fixture
def alpines(app, alice, bob):
    """An `alpine` and a `debian` in each of: bob's images outside namespaces, his `djinn`,
    its child `djinn/ci`, alice's `team` that bob collaborates on, and alice's public `pub`
    that he does not; plus bob's `alpine2` and `Alpine`."""
    places = {"outside": None,
              "djinn": ensure_namespace(bob.user, ("djinn",)),
              "djinn/ci": ensure_namespace(bob.user, ("djinn", "ci")),
              "team@alice": ensure_namespace(alice.user, ("team",)),
              "pub@alice": ensure_namespace(alice.user, ("pub",), "public")}
    Collaborator.create(namespace=places["team@alice"], user=bob.user)
    ids = {}
    for place, namespace in places.items():
        for name in ("alpine", "debian"):
            ids[place, name] = add(bob, name, namespace).id
    add(bob, "alpine2")
    add(bob, "Alpine")
    return ids


def test_name_is_an_exact_and_case_sensitive_match(client, bob, alpines):
    images = client.get("/images?name=alpine", headers=bob.headers).json
    assert [i["name"] for i in images] == ["alpine"] * 4
    # Wherever bob may list: outside namespaces, his namespaces, the ones he collaborates on.
    assert {i["id"] for i in images} == {alpines[place, "alpine"] for place in
                                         ("outside", "djinn", "djinn/ci", "team@alice")}


def test_namespace_is_that_namespace_alone_not_its_children(client, bob, alpines):
    images = client.get("/images?namespace=djinn", headers=bob.headers).json
    assert {i["id"] for i in images} == {alpines["djinn", "alpine"], alpines["djinn", "debian"]}
    assert {i["namespace"]["path"] for i in images} == {"djinn"}
    assert listed(client, bob, namespace="djinn/ci") == ["debian", "alpine"]


def test_name_and_namespace_together_find_one_image(client, bob, alpines):
    (image,) = client.get("/images?name=alpine&namespace=djinn", headers=bob.headers).json
    assert image["id"] == alpines["djinn", "alpine"]
    (image,) = client.get("/images?name=alpine&namespace=team@alice", headers=bob.headers).json
    assert image["id"] == alpines["team@alice", "alpine"]
    assert image["namespace"]["user"]["username"] == "alice"


def test_owner_named_with_at_and_ones_own_name_are_the_same(client, bob, alpines):
    assert listed(client, bob, namespace="djinn@bob") == listed(client, bob, namespace="djinn")


def test_empty_namespace_means_images_outside_namespaces(client, bob, alpines):
    assert listed(client, bob, namespace="") == ["Alpine", "alpine2", "debian", "alpine"]
    assert listed(client, bob, namespace="", name="alpine") == ["alpine"]


def test_empty_namespace_is_the_callers_own_images_only(client, alice, bob, alpines):
    """alice's team images are hers, but "outside namespaces" are bob's own alone."""
    make_rows(alice, 2, prefix="alices")
    assert "alices0" not in listed(client, bob, namespace="")
    assert listed(client, alice, namespace="") == ["alices1", "alices0"]


def test_filters_never_widen_the_list(client, bob, make_account, alpines):
    """alice's public `pub` can be read by anyone, but it is not in bob's list: with the
    filter, as without it, bob's list holds only what he owns or collaborates on."""
    assert listed(client, bob, namespace="pub@alice") == []
    assert listed(client, bob, namespace="pub@alice", name="alpine") == []
    carol = make_account("carol")
    assert listed(client, carol, namespace="team@alice") == []
    assert listed(client, carol, name="alpine") == []


def test_unknown_namespace_and_forbidden_one_answer_alike(client, bob, make_account, alpines):
    carol = make_account("carol")
    answers = [client.get("/images", query_string={"namespace": namespace},
                          headers=carol.headers)
               for namespace in ("team@alice", "nothere@alice", "team@nobody", "nothere")]
    assert len({(a.status_code, a.get_data(), tuple(a.headers)) for a in answers}) == 1
    assert answers[0].status_code == 200 and answers[0].json == []


@pytest.mark.parametrize("namespace", ["a//b", "/djinn", "djinn/", "a-b", "@bob", "djinn@",
                                       "a@b@c", "x" * 33, "/".join(["x"] * 21), "dj\x00inn"])
def test_text_that_is_no_namespace_is_400_on_namespace(client, bob, namespace):
    response = client.get("/images", query_string={"namespace": namespace},
                          headers=bob.headers)
    assert response.status_code == 400
    assert list(response.json) == ["namespace"]


@pytest.mark.parametrize("name", ["", "alpine.qcow2", "a b", "x" * 65, "al\x00pine", "é"])
def test_text_that_is_no_image_name_is_400_on_name(client, bob, name):
    response = client.get("/images", query_string={"name": name}, headers=bob.headers)
    assert response.status_code == 400
    assert response.json == {"name": [NAME_FILTER]}


@pytest.mark.parametrize("search, expected", [
    ("_", ["a_b"]), ("%", ["100%"]), ("A_", ["a_b"]), ("0%", ["100%"]), ("", None)])
def test_search_with_a_filter_takes_percent_and_underscore_literally(
        client, bob, search, expected):
    djinn = ensure_namespace(bob.user, ("djinn",))
    for name in ("a_b", "axb", "100%", "1000"):
        add(bob, name, djinn)
        add(bob, f"{name}x".replace("%", "pct"))  # outside the namespace: never listed
    names = listed(client, bob, namespace="djinn", search=search)
    assert names == (expected or ["1000", "100%", "axb", "a_b"])


def test_exactly_25_in_a_namespace_is_one_page(client, bob):
    make_rows(bob, 25, namespace=ensure_namespace(bob.user, ("djinn",)))
    make_rows(bob, 3, prefix="outside")
    response = client.get("/images?namespace=djinn", headers=bob.headers)
    assert len(response.json) == 25 and "Link" not in response.headers


def test_pages_and_links_keep_the_filters(client, bob):
    djinn = ensure_namespace(bob.user, ("djinn",))
    make_rows(bob, 26, prefix="go", namespace=djinn)
    make_rows(bob, 30, prefix="go")  # outside the namespace
    first = client.get("/images?namespace=djinn&search=go", headers=bob.headers)
    assert [i["name"] for i in first.json] == [f"go{i}" for i in range(25, 0, -1)]
    assert first.headers["Link"] == (
        '<http://localhost/images?page=2&namespace=djinn&search=go>; rel="next"')
    second = client.get("/images?namespace=djinn&search=go&page=2", headers=bob.headers)
    assert [i["name"] for i in second.json] == ["go0"]
    assert second.headers["Link"] == (
        '<http://localhost/images?page=1&namespace=djinn&search=go>; rel="prev"')


def test_links_keep_an_empty_namespace_and_a_name(client, bob):
    make_rows(bob, 30, prefix="same")
    Image.update(name="same").where(Image.name == "same0").execute()
    response = client.get("/images?namespace=&name=same", headers=bob.headers)
    assert listed(client, bob, namespace="", name="same") == ["same"]
    assert "Link" not in response.headers
    page = client.get("/images?namespace=&page=1", headers=bob.headers)
    assert page.headers["Link"] == '<http://localhost/images?page=2&namespace=>; rel="next"'


@pytest.mark.parametrize("page", ["0", "-1", "abc", "", "²"])
def test_bad_page_with_a_filter_means_1(client, bob, page):
    make_rows(bob, 30, namespace=ensure_namespace(bob.user, ("djinn",)))
    response = client.get(f"/images?namespace=djinn&page={page}", headers=bob.headers)
    assert response.status_code == 200
    assert response.json[0]["name"] == "img29" and len(response.json) == 25


def test_page_past_the_end_with_a_filter_is_empty(client, bob, alpines):
    response = client.get("/images?namespace=djinn&page=3", headers=bob.headers)
    assert response.status_code == 200 and response.json == []
    assert response.headers["Link"] == (
        '<http://localhost/images?page=2&namespace=djinn>; rel="prev"')


@pytest.mark.parametrize("query", ["namespace=team@alice", "namespace=djinn&name=alpine",
                                   "namespace=&search=a", "name=alpine&page=2",
                                   "namespace=nothere"])
def test_a_filtered_page_runs_at_most_3_queries(client, bob, alpines, query):
    response, queries = count_queries_of(lambda: client.get(f"/images?{query}",
                                                            headers=bob.headers))
    assert response.status_code == 200
    assert queries <= 3  # the token, the namespace (or the shared ones), the page


def test_name_filter_past_200_shared_namespaces(client, alice, bob):
    """Past 200 shared namespaces the page reads them in one term (test_list_pages): the
    name filter holds there too."""
    team = ensure_namespace(alice.user, ("team",))
    Collaborator.create(namespace=team, user=bob.user)
    children = [ensure_namespace(alice.user, ("team", f"c{k}")) for k in range(201)]
    for k in (0, 100, 200):
        add(alice, "alpine", children[k])
        add(alice, "debian", children[k])
    names = listed(client, bob, name="alpine")
    assert names == ["alpine"] * 3
