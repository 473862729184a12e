"""The list walks each source of a user's images in index order and merges them: pages must
come out exactly as one "owned or shared, newest first" query would give them."""

import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest
from flask.json.provider import DefaultJSONProvider
from playhouse.test_utils import count_queries

import queries
from models import Collaborator, Image, Namespace, User
from namespaces import ensure_namespace
from queries import RELATIONS, find_image
from representations import image_json, rfc3339


def add_images(rows):
    """Insert (name, owner, namespace, second) rows; listing reads rows, never files."""
    start = datetime(2024, 1, 1)
    Image.insert_many([
        {"author": owner, "user": owner, "namespace": ns, "name": name,
         "storage_key": f"key-{name}", "size": 1, "virtual_size": 1, "sha256": "0" * 64,
         "created_at": start + timedelta(seconds=second)}
        for name, owner, ns, second in rows
    ]).execute()


def all_pages(client, account, search=None):
    """Every page of the list, following the Link header's next page until there is none."""
    names, page = [], 1
    while True:
        query = {"page": page, **({"search": search} if search else {})}
        response = client.get("/images", query_string=query, headers=account.headers)
        assert response.status_code == 200
        names += [image["name"] for image in response.json]
        if 'rel="next"' not in response.headers.get("Link", ""):
            return names
        page += 1


def test_pages_merge_own_and_every_shared_namespace_newest_first(client, alice, bob):
    team_a = ensure_namespace(alice.user, ("team", "a"))
    team_b = ensure_namespace(alice.user, ("team", "b"))
    hidden = ensure_namespace(alice.user, ("private",))
    own = ensure_namespace(bob.user, ("own",))
    Collaborator.create(namespace=team_a.root, user=bob.user)
    Collaborator.create(namespace=own, user=bob.user)  # his own root too: listed once
    sources = [(bob.user, None), (alice.user, team_a), (alice.user, team_b), (bob.user, own),
               (alice.user, hidden)]
    # 90 images, the sources taking turns, several in the same second (ties go by id).
    rows = [(f"img{i}", *sources[i % 5], i // 3) for i in range(90)]
    add_images(rows)
    expected = [name for name, owner, ns, _ in reversed(rows) if ns is not hidden]
    assert all_pages(client, bob) == expected
    assert len(expected) == 72


def test_search_applies_to_every_source_before_paging(client, alice, bob):
    team = ensure_namespace(alice.user, ("team",))
    Collaborator.create(namespace=team, user=bob.user)
    rows = [(f"{'go' if i % 2 else 'rust'}{i}", *((bob.user, None), (alice.user, team))[i % 3 % 2],
             i) for i in range(120)]
    add_images(rows)
    expected = [name for name, *_ in reversed(rows) if name.startswith("go")]
    assert all_pages(client, bob, search="go") == expected


def statements_of(request):
    """What request() returns, and the SQL statements it ran (peewee's own log of
    execute_sql)."""
    peewee_log = logging.getLogger("peewee")
    level = peewee_log.level
    try:
        with count_queries() as queries:
            response = request()
    finally:
        peewee_log.setLevel(level)  # count_queries leaves peewee's logger at DEBUG
    return response, [query.msg[0] for query in queries.get_queries()]


def count_queries_of(request):
    """What request() returns, and how many SQL statements it ran."""
    response, statements = statements_of(request)
    return response, len(statements)


def test_past_200_shared_namespaces_are_read_in_one_term(client, alice, bob):
    """The page's SQL has one index walk per shared namespace up to 200, then one term
    for all of them: the same pages either way, in the same 3 queries."""
    team = ensure_namespace(alice.user, ("team",))
    Collaborator.create(namespace=team, user=bob.user)
    children = [ensure_namespace(alice.user, ("team", f"c{k}")) for k in range(201)]
    rows = [(f"img{i}", *((bob.user, None), (alice.user, children[i * 7 % 201]),
                          (alice.user, team))[i % 3], i) for i in range(60)]
    add_images(rows)
    assert all_pages(client, bob) == [name for name, *_ in reversed(rows)]
    assert all_pages(client, bob, search="img5") == [
        name for name, *_ in reversed(rows) if "img5" in name]
    response, queries = count_queries_of(
        lambda: client.get("/images?page=2", headers=bob.headers))
    assert response.status_code == 200 and len(response.json) == 25
    assert queries <= 3  # the token with its user, the shared namespaces, the page


@pytest.mark.parametrize("query", ["", "?page=2", "?search=img&page=2", "?page=9"])
def test_list_page_runs_at_most_3_queries(client, alice, bob, query):
    team = ensure_namespace(alice.user, ("team", "sub"))
    Collaborator.create(namespace=team.root, user=bob.user)
    add_images([(f"img{i}", *((bob.user, None), (alice.user, team))[i % 2], i)
                for i in range(60)])
    response, queries = count_queries_of(lambda: client.get("/images" + query,
                                                            headers=bob.headers))
    assert response.status_code == 200
    assert queries <= 3


def rfc3339_before(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def user_json_before(user):
    return {"id": user.id, "email": user.email, "username": user.username,
            "created_at": rfc3339_before(user.created_at)}


def namespace_json_before(ns, base_url):
    return {"id": ns.id, "user_id": ns.user_id, "root_id": ns.root_id, "parent_id": ns.parent_id,
            "name": ns.name, "path": ns.path, "description": ns.description,
            "visibility": ns.visibility, "created_at": rfc3339_before(ns.created_at),
            "url": f"{base_url}/n/{ns.user.username}/{ns.path}",
            "images_url": f"{base_url}/n/{ns.user.username}/{ns.path}/-/images",
            "user": user_json_before(ns.user)}


def download_json_before(image):
    if image.download_created_at is None:
        return None
    times = [image.download_created_at, image.download_started_at, image.download_finished_at]
    return {"source": image.download_source, "error": image.download_error,
            **{key: t and rfc3339_before(t) for key, t in
               zip(("created_at", "started_at", "finished_at"), times, strict=True)}}


def image_json_before(image, base_url):
    """The image object as representations built it from model objects before the list
    page read plain rows: the reference that every answer must still match byte for byte."""
    ns = image.namespace
    return {"id": image.id, "author_id": image.author_id, "user_id": image.user_id,
            "namespace_id": image.namespace_id, "name": image.name,
            "created_at": rfc3339_before(image.created_at), "url": f"{base_url}/images/{image.id}",
            "author": user_json_before(image.author), "user": user_json_before(image.user),
            "namespace": namespace_json_before(ns, base_url) if ns else None,
            "size": image.size, "virtual_size": image.virtual_size, "sha256": image.sha256,
            "driver": "qemu", "download": download_json_before(image)}


def json_bytes_before(app, body):
    """body as Flask's own JSON provider answered it (compact, ASCII, keys in order)."""
    provider = DefaultJSONProvider(app)
    provider.sort_keys = False
    with app.app_context():
        return provider.response(body).get_data()


@pytest.fixture
def mixed_images(app, alice, bob):
    """Images bob lists: his own without namespace and in his namespace, and alice's in a
    root and a child namespace that he collaborates on (one of them authored by him), with
    non-ASCII text, a time with microseconds and a time at the end of a year."""
    User.update(email="bøb@exämple.com").where(User.id == bob.user.id).execute()
    team = ensure_namespace(alice.user, ("team",), "internal")
    sub = ensure_namespace(alice.user, ("team", "sub"))
    Namespace.update(description='Équipe ✓ "quoted" </script>\n\u2028').where(
        Namespace.id == team.id).execute()
    Collaborator.create(namespace=team, user=bob.user)
    own = ensure_namespace(bob.user, ("own",))
    moments = [datetime(2024, 1, 2, 3, 4, 5, 678901), datetime(1999, 12, 31, 23, 59, 59),
               datetime(2024, 1, 2, 3, 4, 6), datetime(2024, 1, 2, 3, 4, 6)]
    for name, author, owner, ns, moment in [
            ("plain", bob, bob, None, moments[0]), ("rooted", alice, alice, team, moments[1]),
            ("nested", bob, alice, sub, moments[2]), ("mine", bob, bob, own, moments[3])]:
        Image.create(author=author.user, user=owner.user, namespace=ns, name=name,
                     storage_key=f"key-{name}", size=197632, virtual_size=1 << 30,
                     sha256="ab" * 32, created_at=moment)
    Image.create(author=alice.user, user=alice.user, name="hidden", storage_key="key-hidden",
                 size=1, virtual_size=1, sha256="0" * 64)
    add_imports(bob, team)


def add_imports(bob, namespace):
    """Three imports from a URL: one not started (no file yet), one that failed while
    fetching, one that finished (its file columns filled in)."""
    source = "https://user@example.com/a%20b.qcow2?x=1"
    created = datetime(1990, 5, 6, 7, 8, 9)
    started, finished = created + timedelta(seconds=1), created + timedelta(seconds=2)
    for name, ns, error, times, fields in [
            ("queued", None, None, (None, None), {}),
            ("failed", namespace, "HTTP 404 from https://example.com/a", (started, finished), {}),
            ("fetched", None, None, (started, finished),
             {"storage_key": "key-fetched", "size": 5, "virtual_size": 6, "sha256": "cd" * 32})]:
        Image.create(author=bob.user, user=namespace.user if ns else bob.user, namespace=ns,
                     name=name, created_at=created, download_source=source,
                     download_error=error, download_created_at=created,
                     download_started_at=times[0], download_finished_at=times[1], **fields)


def peewee_image(image_id):
    """The image as peewee's own reader makes it from find_image's query: the reference
    for find_image's objects, which compiled.graph makes."""
    return queries._with_relations().where(Image.id == image_id).first()


def at_path(image, path):
    """The object at an attribute path of RELATIONS ("namespace.user"), or None."""
    for attr in filter(None, path.split(".")):
        image = image and getattr(image, attr)
    return image


def test_find_image_makes_the_objects_that_peewee_makes(mixed_images):
    ids = [image.id for image in Image.select().order_by(Image.id)]
    for image_id in ids:  # one after another: each run binds its own id
        with count_queries() as counted:
            ours = find_image(image_id)
            mine_all = [at_path(ours, path) for path in RELATIONS]
        assert counted.count == 1  # the relations came with it, none loaded later
        theirs = peewee_image(image_id)
        for path, mine in zip(RELATIONS, mine_all, strict=True):
            reference = at_path(theirs, path)
            assert type(mine) is type(reference)
            assert (mine and mine.__data__) == (reference and reference.__data__), path
            assert not (mine and mine._dirty)  # loaded, not changed: a save writes nothing new
    nested = find_image(Image.get(Image.name == "nested").id)
    assert (nested.author.username, nested.user.username) == ("bob", "alice")
    assert nested.namespace.user.username == "alice"
    assert find_image(Image.get(Image.name == "plain").id).namespace is None
    assert find_image(max(ids) + 1) is None


def test_list_page_is_byte_for_byte_the_json_of_model_objects(app, client, bob, mixed_images):
    response = client.get("/images", headers=bob.headers)
    assert response.status_code == 200
    listed = response.json
    # Newest first; "mine" and "nested" share a second, so the larger id goes first.
    assert [i["name"] for i in listed] == ["mine", "nested", "plain", "rooted",
                                           "fetched", "failed", "queued"]
    models = [peewee_image(image["id"]) for image in listed]
    base = "http://localhost"
    assert listed == [image_json(image, base) for image in models]
    assert response.get_data() == json_bytes_before(
        app, [image_json_before(image, base) for image in models])
    # What the comparison covered: no namespace, a root's null parent, text and times.
    plain, rooted = listed[2], listed[3]
    assert plain["namespace_id"] is None and plain["namespace"] is None
    assert rooted["namespace"]["parent_id"] is None
    nested = listed[1]
    assert nested["namespace"]["parent_id"] == rooted["namespace_id"]
    assert nested["author_id"] != nested["user_id"]
    assert plain["created_at"] == "2024-01-02T03:04:05Z"
    assert rooted["created_at"] == "1999-12-31T23:59:59Z"
    assert b"b\\u00f8b@ex\\u00e4mple.com" in response.get_data()
    # Every image says its driver; an uploaded one has no download, an import has one,
    # and its file fields are null until it finished.
    assert {i["driver"] for i in listed} == {"qemu"} and plain["download"] is None
    fetched, failed, queued = listed[4:]
    assert queued["download"] == {"source": "https://user@example.com/a%20b.qcow2?x=1",
                                  "error": None, "created_at": "1990-05-06T07:08:09Z",
                                  "started_at": None, "finished_at": None}
    assert (queued["size"], queued["virtual_size"], queued["sha256"]) == (None, None, None)
    assert failed["download"]["error"] == "HTTP 404 from https://example.com/a"
    assert failed["download"]["finished_at"] == "1990-05-06T07:08:11Z"
    assert fetched["download"]["error"] is None and fetched["size"] == 5


def test_single_image_is_byte_for_byte_the_json_of_model_objects(app, client, bob,
                                                                 mixed_images):
    for image in list(Image.select().where(Image.name != "hidden")):
        response = client.get(f"/images/{image.id}", headers=bob.headers)
        assert response.status_code == 200
        expected = image_json_before(peewee_image(image.id), "http://localhost")
        assert response.get_data() == json_bytes_before(app, expected)


@pytest.mark.parametrize("moment", [
    datetime(2024, 1, 2, 3, 4, 5), datetime(2024, 1, 2, 3, 4, 5, 1), datetime(9999, 12, 31),
    datetime(1000, 1, 1), datetime(999, 1, 1, 1, 1, 1), datetime(1, 1, 1),
    datetime(2024, 6, 1, 12, tzinfo=UTC),
    datetime(2024, 6, 1, 12, tzinfo=timezone(timedelta(hours=2))),
])
def test_rfc3339_writes_what_strftime_wrote(moment):
    assert rfc3339(moment) == rfc3339_before(moment)


@pytest.mark.parametrize("moment", [
    datetime(2024, 1, 2, 3, 4, 5), datetime(2024, 1, 2, 3, 4, 5, 1), datetime(9999, 12, 31),
    datetime(999, 1, 1, 1, 1, 1), datetime(2024, 6, 1, 12, tzinfo=UTC),
])
def test_rfc3339_of_sqlite_text_is_that_of_the_datetime(moment):
    """The list page formats SQLite's text of a time without parsing it (compiled.rows with
    stored_datetimes): the same answer as from the datetime."""
    assert rfc3339(str(moment)) == rfc3339_before(moment)
