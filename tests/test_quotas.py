"""Quotas (API.md "Quotas", docs/api.md): limits of bytes and images on a user, or on a root
namespace and all below it, set with `flask quota`; an upload that would pass one is refused
`403 {"message": "Quota exceeded: …"}` before its body is read when its length is known,
and again in the transaction that records it, so that of two racing uploads one wins."""

import io
import json
import socket
import threading

import pytest
from conftest import read_answer, server_with_account
from test_races import race, stored_files

from models import Image, Namespace, PostgresqlDatabase, Quota, db, write_transaction
from namespaces import ensure_namespace
from quotas import QuotaExceeded, check_quota_at_record


def quota(runner, *args):
    """Run `flask quota ARGS`; return the result (exit_code, output)."""
    return runner.invoke(args=["quota", *args])


def set_quota(runner, target, **limits):
    """`flask quota set TARGET --bytes … --images …`, which must succeed."""
    options = [x for name, value in limits.items() for x in (f"--{name}", str(value))]
    result = quota(runner, "set", target, *options)
    assert result.exit_code == 0, result.output
    return result.output


def post_chunked(client, account, body, **query):
    """A chunked POST /images as gunicorn presents it (no length, the stream ends itself)."""
    return client.post("/images", query_string=query, headers={
        **account.headers, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": body, "wsgi.input_terminated": True})


def add_pending_import(account, name):
    """An import's row as the import code writes it at the POST: no file, no size yet."""
    return Image.create(author=account.user, user=account.user, name=name,
                        download_source="https://example.com/x.qcow2")


# --- the admin commands ------------------------------------------------------------------

def test_quota_set_show_and_clear_for_a_user(runner, alice, upload, qcow2_bytes):
    assert upload(alice, "one").status_code == 201
    size = len(qcow2_bytes)
    assert set_quota(runner, "alice", bytes="50G", images=100).splitlines() == [
        "quota of user alice",
        f"bytes: {size} used ({size // 1024}K), limit 53687091200 (50G)",
        "images: 1 used, limit 100",
    ]
    assert (Quota.get().max_bytes, Quota.get().max_images) == (50 << 30, 100)
    assert quota(runner, "show", "alice").output == set_quota(runner, "alice", images=100)
    cleared = quota(runner, "clear", "alice")
    assert (cleared.exit_code, cleared.output) == (0, "cleared the quota of user alice\n")
    assert quota(runner, "show", "alice").output.splitlines() == [
        "quota of user alice: none set",
        f"bytes: {size} used ({size // 1024}K), no limit",
        "images: 1 used, no limit",
    ]
    assert Quota.select().count() == 0


def test_quota_set_changes_only_the_limits_given_and_none_lifts_one(runner, alice):
    set_quota(runner, "alice", bytes="1M", images=5)
    set_quota(runner, "alice", images=7)
    assert (Quota.get().max_bytes, Quota.get().max_images) == (1 << 20, 7)
    assert set_quota(runner, "alice", bytes="none").splitlines()[1:] == [
        "bytes: 0 used (0), no limit", "images: 0 used, limit 7"]
    assert (Quota.get().max_bytes, Quota.get().max_images) == (None, 7)


def test_a_namespace_quota_is_set_on_its_root(runner, alice, upload):
    assert upload(alice, "deep", namespace="team/dev").status_code == 201
    assert set_quota(runner, "team@alice", images=10).splitlines()[::2] == [
        "quota of namespace team@alice", "images: 1 used, limit 10"]
    assert Quota.get().namespace.path == "team"
    child = quota(runner, "set", "team/dev@alice", "--images", "3")
    assert child.exit_code != 0
    assert "team/dev@alice is not a root" in child.output and "use team@alice" in child.output
    assert Quota.get().max_images == 10


@pytest.mark.parametrize("options, message", [
    (["--bytes", "5X"], "not a size: '5X'"),
    (["--bytes", "-1"], "not a size: '-1'"),
    (["--bytes", "9000000P"], f"at most {(1 << 63) - 1}"),
    (["--images", "-1"], "not a number of images: '-1'"),
    (["--images", "ten"], "not a number of images: 'ten'"),
    ([], "give --bytes, --images or both"),
])
def test_quota_set_refuses_bad_values_and_writes_nothing(runner, alice, options, message):
    result = quota(runner, "set", "alice", *options)
    assert result.exit_code == 2 and message in result.output, result.output
    assert Quota.select().count() == 0


@pytest.mark.parametrize("command", ["set", "show", "clear"])
@pytest.mark.parametrize("target, message", [
    ("nobody", "no user named 'nobody'"),
    ("team@nobody", "no user named 'nobody'"),
    ("none@alice", "no namespace 'none@alice'"),
    ("team/dev", "name the owner: PATH@OWNER"),
    ("a//b@alice", "Namespace path segments must match"),
])
def test_quota_commands_refuse_unknown_users_and_namespaces(runner, alice, command, target,
                                                            message):
    limits = ["--images", "1"] if command == "set" else []
    result = quota(runner, command, target, *limits)
    assert result.exit_code != 0 and message in result.output, result.output
    assert Quota.select().count() == 0


def test_quota_clear_without_a_quota_fails(runner, alice):
    result = quota(runner, "clear", "alice")
    assert result.exit_code == 1 and "user alice has no quota" in result.output


# --- the checks of an upload -------------------------------------------------------------

def test_an_upload_past_the_byte_quota_is_refused_before_its_body_is_read(
        client, runner, alice, upload, qcow2_bytes, store_files):
    size = len(qcow2_bytes)
    set_quota(runner, "alice", bytes=2 * size)
    assert upload(alice, "one").status_code == 201
    assert upload(alice, "two").status_code == 201  # exactly at the limit: accepted
    before = store_files()
    body = io.BytesIO(qcow2_bytes)
    response = client.post("/images?name=three", headers=alice.headers, input_stream=body,
                           content_length=size)
    assert response.status_code == 403
    assert response.json == {"message": f"Quota exceeded: user alice may keep {2 * size} "
                                        f"bytes; {2 * size} in use, and this image is "
                                        f"{size} bytes"}
    assert body.tell() == 0, "the body was read"
    assert (store_files(), Image.select().count()) == (before, 2)


def test_an_upload_past_the_image_quota_is_refused(runner, alice, upload, store_files):
    set_quota(runner, "alice", images=1)
    assert upload(alice, "one").status_code == 201
    before = store_files()
    response = upload(alice, "two", namespace="new")
    assert (response.status_code, response.json) == (403, {
        "message": "Quota exceeded: user alice may keep 1 image; 1 in use"})
    assert (store_files(), Image.select().count(), Namespace.select().count()) == (before, 1, 0)


def test_a_chunked_upload_is_refused_when_recorded_and_leaves_nothing(
        client, runner, alice, upload, qcow2_bytes, store_files):
    """Without a length the early check lets it in; the record-time check, which knows the
    size, refuses it: no row, no file, no staged file, no namespace it would have made."""
    size = len(qcow2_bytes)
    set_quota(runner, "alice", bytes=2 * size - 1)
    assert upload(alice, "one").status_code == 201
    before = store_files()
    response = post_chunked(client, alice, io.BytesIO(qcow2_bytes), name="two",
                            namespace="new/sub")
    assert (response.status_code, response.json) == (403, {
        "message": f"Quota exceeded: user alice may keep {2 * size - 1} bytes; {size} in "
                   f"use, and this image is {size} bytes"})
    assert (store_files(), Image.select().count(), Namespace.select().count()) == (before, 1, 0)


def test_a_chunked_upload_to_a_full_quota_is_refused_before_its_body(
        client, runner, alice, upload, qcow2_bytes):
    """Length unknown, but no image has less than one byte: a quota with no byte left."""
    set_quota(runner, "alice", bytes=len(qcow2_bytes))
    assert upload(alice, "one").status_code == 201
    body = io.BytesIO(qcow2_bytes)
    response = post_chunked(client, alice, body, name="two")
    assert response.status_code == 403
    assert response.json["message"].endswith(f"; {len(qcow2_bytes)} in use")
    assert body.tell() == 0


def test_a_namespace_quota_counts_its_children(runner, alice, upload):
    ensure_namespace(alice.user, ("team",))
    set_quota(runner, "team@alice", images=2)
    assert upload(alice, "a", namespace="team").status_code == 201
    assert upload(alice, "b", namespace="team/dev").status_code == 201
    refused = upload(alice, "c", namespace="team/dev/new")
    assert (refused.status_code, refused.json) == (403, {
        "message": "Quota exceeded: namespace team@alice may keep 2 images; 2 in use"})
    assert upload(alice, "d", namespace="other").status_code == 201
    assert upload(alice, "e").status_code == 201
    assert sorted(ns.path for ns in Namespace.select()) == ["other", "team", "team/dev"]


def test_an_image_in_a_namespace_counts_for_its_owner_not_its_author(
        runner, alice, bob, upload):
    """A collaborator's upload into the owner's namespace is the owner's image (user_id),
    in the owner's quota; the collaborator's own quota is not touched."""
    runner.invoke(args=["namespace", "create", "team", "--owner", "alice"])
    runner.invoke(args=["namespace", "add-collaborator", "team@alice", "bob"])
    set_quota(runner, "alice", images=1)
    set_quota(runner, "bob", images=0)
    assert upload(bob, "from-bob", namespace="team@alice").status_code == 201
    refused = upload(bob, "again", namespace="team@alice")
    assert refused.json == {"message": "Quota exceeded: user alice may keep 1 image; "
                                       "1 in use"}
    assert upload(bob, "own").json == {"message": "Quota exceeded: user bob may keep 0 images; "
                                                  "0 in use"}


def test_an_import_in_progress_counts_as_an_image_without_bytes(runner, alice, upload):
    add_pending_import(alice, "coming")
    assert set_quota(runner, "alice", images=1, bytes="1M").splitlines()[1:] == [
        "bytes: 0 used (0), limit 1048576 (1M)", "images: 1 used, limit 1"]
    assert upload(alice, "now").json == {
        "message": "Quota exceeded: user alice may keep 1 image; 1 in use"}


def test_an_import_given_its_file_is_checked_without_counting_itself_twice(alice, runner):
    """What the import code calls when the file of a pending row is recorded."""
    pending = add_pending_import(alice, "coming")
    set_quota(runner, "alice", images=1, bytes=1000)
    with write_transaction():
        check_quota_at_record(alice.user, None, 1000, except_image=pending.id)
        with pytest.raises(QuotaExceeded) as refused:
            check_quota_at_record(alice.user, None, 1001, except_image=pending.id)
    assert (refused.value.status, refused.value.label, refused.value.unit) == (
        403, "user alice", "bytes")
    assert refused.value.message == ("Quota exceeded: user alice may keep 1000 bytes; 0 in "
                                     "use, and this image is 1001 bytes")


# --- races -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bytes", "images"])
def test_of_two_racing_uploads_that_together_pass_the_quota_one_wins(
        app, runner, alice, qcow2_bytes, kind):
    """Both pass the early check before either body is read (race() holds each body at its
    first read until both are there); the record-time check lets one in (SQLite and
    PostgreSQL, by the app fixture)."""
    size = len(qcow2_bytes)
    set_quota(runner, "alice", **{"bytes": size * 3 // 2} if kind == "bytes" else {"images": 1})
    responses = race(app, alice, qcow2_bytes, [("one", None), ("two", None)])
    assert sorted(r.status_code for r in responses) == [201, 403], [r.json for r in responses]
    loser = next(r for r in responses if r.status_code == 403)
    assert loser.json["message"].startswith("Quota exceeded: user alice may keep")
    assert stored_files(app) == ([Image.get().storage_key], [])


def test_on_postgresql_a_record_time_check_waits_for_the_one_holding_the_quota(app, alice,
                                                                               runner):
    """SELECT … FOR UPDATE on the quota: the second check blocks until the first upload's
    transaction commits, then counts its image. (SQLite: the write transaction holds the
    whole database from its BEGIN IMMEDIATE.)"""
    if not isinstance(db.obj, PostgresqlDatabase):
        pytest.skip("row locks are PostgreSQL's")
    set_quota(runner, "alice", images=1)
    recorded, release, second_done = threading.Event(), threading.Event(), threading.Event()
    outcome = {}

    def first():
        with db.connection_context(), write_transaction():
            check_quota_at_record(alice.user, None, 10)
            Image.create(author=alice.user, user=alice.user, name="first", size=10)
            recorded.set()
            release.wait(60)

    def second():
        with db.connection_context():
            outcome["pid"] = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
            try:
                with write_transaction():
                    check_quota_at_record(alice.user, None, 10)
                outcome["result"] = "passed"
            except QuotaExceeded as error:
                outcome["result"] = error.message
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert recorded.wait(30)
    threads[1].start()
    while not second_done.wait(0.05) and not waits_for_a_lock(outcome.get("pid")):
        pass
    blocked = "result" not in outcome
    release.set()
    for thread in threads:
        thread.join(60)
    assert blocked, f"the second check did not wait: {outcome['result']}"
    assert outcome["result"] == "Quota exceeded: user alice may keep 1 image; 1 in use"


def waits_for_a_lock(pid):
    """Whether PostgreSQL's backend pid is waiting for a lock held by another."""
    if pid is None:
        return False
    row = db.execute_sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                         (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


# --- a real server -----------------------------------------------------------------------

def test_a_real_server_refuses_from_the_head_alone(tmp_path):
    """Over gunicorn, a raw socket sends the head of a 2 MiB upload and no body byte: the
    403 comes all the same, and the connection is closed."""
    with server_with_account(tmp_path, "carol") as server:
        server.flask("quota", "set", "carol", "--bytes", "1M")
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"POST /images?name=big HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: {server.headers['Authorization']}\r\n"
                         f"Content-Length: {2 << 20}\r\n\r\n".encode())
            status, head, body = read_answer(sock)
    assert (status, json.loads(body)) == (403, {
        "message": "Quota exceeded: user carol may keep 1048576 bytes; 0 in use, and this "
                   "image is 2097152 bytes"})
    assert b"\r\nconnection: close\r\n" in head.lower() + b"\r\n"
