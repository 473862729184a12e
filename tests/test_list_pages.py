"""The list walks each source of a user's images in index order and merges them: pages must
come out exactly as one "owned or shared, newest first" query would give them."""

from datetime import datetime, timedelta

from models import Collaborator, Image
from namespaces import ensure_namespace


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
