"""Races between concurrent uploads, settled by the database, on every engine and store.

Each upload's body is held at its first read until both requests have passed
the early name check, so that both really reach the database together.
"""

import io
import os
import secrets
import threading

import pytest
from peewee import IntegrityError

from models import Image, Namespace, db
from namespaces import ensure_namespace

# S3 needs moto_server, a server process: slow, as every S3 test is (conftest.py).
STORES = ("local", pytest.param("s3", marks=pytest.mark.slow))


class GatedBody(io.BytesIO):
    """A request body whose first read waits until every racer has got that far."""

    def __init__(self, data, gate):
        super().__init__(data)
        self._gate = gate

    def _pass_gate(self):
        if self._gate is not None:
            self._gate.wait(timeout=30)
            self._gate = None

    def read(self, size=-1):
        self._pass_gate()
        return super().read(size)

    def read1(self, size=-1):
        self._pass_gate()
        return super().read1(size)

    def readinto(self, buffer):
        self._pass_gate()
        return super().readinto(buffer)


@pytest.fixture(params=STORES)
def race_app(request, make_app):
    """The app on the local folder or on an S3 bucket."""
    if request.param == "local":
        return make_app()
    bucket = request.getfixturevalue("s3_bucket")
    return make_app(STORAGE_URL=f"s3://{bucket.name}/images")


def stored_files(app):
    """Every stored image file, and every staged one, wherever the store keeps them."""
    store = app.extensions["storage"]
    return store.keys(), os.listdir(store.staging_folder)


def race(app, account, data, uploads):
    """Send uploads ([(name, namespace)]) at once; return their responses in order."""
    gate = threading.Barrier(len(uploads))
    responses = [None] * len(uploads)

    def send(i, name, namespace):
        query = {"name": name, **({"namespace": namespace} if namespace else {})}
        responses[i] = app.test_client().post(
            "/images", query_string=query, headers=account.headers,
            input_stream=GatedBody(data, gate), content_length=len(data))

    threads = [threading.Thread(target=send, args=(i, *u)) for i, u in enumerate(uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


def test_same_name_race_has_one_winner_and_leaves_no_file(race_app, alice, qcow2_bytes):
    responses = race(race_app, alice, qcow2_bytes, [("twin", None), ("twin", None)])
    codes = sorted(r.status_code for r in responses)
    assert codes == [201, 400], [r.json for r in responses]
    loser = next(r for r in responses if r.status_code == 400)
    assert loser.json == {"name": ["Name already exists"]}
    winner = Image.get()
    assert stored_files(race_app) == ([winner.storage_key], [])


def test_same_name_race_in_a_namespace(race_app, alice, qcow2_bytes):
    responses = race(race_app, alice, qcow2_bytes, [("twin", "team"), ("twin", "team")])
    assert sorted(r.status_code for r in responses) == [201, 400]
    assert Namespace.select().count() == 1
    assert stored_files(race_app) == ([Image.get().storage_key], [])


def test_race_creating_one_new_namespace_gives_both_the_same(race_app, alice, qcow2_bytes):
    responses = race(race_app, alice, qcow2_bytes, [("one", "team/dev"), ("two", "team/dev")])
    assert [r.status_code for r in responses] == [201, 201], [r.json for r in responses]
    ids = {r.json["namespace"]["id"] for r in responses}
    assert len(ids) == 1
    assert sorted(ns.path for ns in Namespace.select()) == ["team", "team/dev"]
    assert len(stored_files(race_app)[0]) == 2


def test_the_database_itself_refuses_a_taken_name(app, alice, bob):
    """The unique indexes that settle races: per owner outside namespaces (a partial
    index, since NULLs are distinct), per namespace inside one."""
    team = ensure_namespace(alice.user, ("team",))

    def add(owner, namespace=None):
        with db.atomic():
            return Image.create(author=owner, user=owner, namespace=namespace, name="dup",
                                storage_key=secrets.token_hex(16), size=1, virtual_size=1,
                                sha256="0" * 64)

    add(alice.user)
    add(bob.user)
    add(alice.user, team)
    for owner, namespace in ((alice.user, None), (bob.user, team)):
        with pytest.raises(IntegrityError):
            add(owner, namespace)
    assert Image.select().count() == 3
