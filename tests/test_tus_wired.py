"""A tus upload (API.md "Resumable uploads") is an upload like a POST /images: the image it
makes sends its `created` webhook event, it is held to the quotas from its creation on (and
counted against them until it ends), and it is counted in /metrics and written to the audit
log as stored or refused. Flask's test client, on every engine."""

import json
import os
import threading
from pathlib import Path

import pytest
import sample_images
import test_webhooks
from conftest import local_store
from test_audit import lines_of, token_id, without_time
from test_metrics import RECEIVED, grown, scrape, uploads
from test_quotas import quota, set_quota
from test_tus import checksum, create, head, path_of, send, upload_in_pieces, uploads_folder

import jobs
import tusuploads
from models import Image, Quota, Upload, db, locking, utcnow, write_transaction
from namespaces import ensure_namespace
from quotas import check_quota_early

hook, receiver = test_webhooks.hook, test_webhooks.receiver  # their fixtures, here too

# --- webhooks ----------------------------------------------------------------------------


def test_a_tus_upload_sends_the_created_event_of_its_image(client, alice, hook, receiver,
                                                           qcow2_bytes):
    team = receiver()
    hook("team@alice", team.url)
    _, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000], name="alpine",
                               namespace="team")
    assert last.status_code == 204
    assert jobs.run_due_jobs() == 1
    (sent,) = team.wait_for(1)
    assert sent["signed"]
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert json.loads(sent["body"]) == {"action": "created", "image": image}


# --- quotas ------------------------------------------------------------------------------


def test_a_tus_upload_past_the_byte_quota_is_refused_at_its_creation(client, runner, alice):
    set_quota(runner, "alice", bytes=1000)
    answer = create(client, alice, 1001)
    assert (answer.status_code, answer.get_json()) == (403, {
        "message": "Quota exceeded: user alice may keep 1000 bytes; 0 in use, and this "
                   "image is 1001 bytes"})
    assert Upload.select().count() == 0
    assert create(client, alice, 1000).status_code == 201  # exactly at the limit


def test_a_creation_past_the_quota_is_refused_without_waiting_for_the_quotas_lock(
        app, client, runner, alice):
    """The early check needs no lock: while another upload's transaction holds the quota
    (on SQLite, the database's write lock), a creation that cannot fit is refused at once."""
    set_quota(runner, "alice", bytes=1000)
    held, release, holder_saw = threading.Event(), threading.Event(), {}

    def hold():
        with db.connection_context(), write_transaction():
            list(locking(Quota.select()))
            held.set()
            holder_saw["release"] = release.wait(60)  # else it let go for the request

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        answer = create(client, alice, 1001)
    finally:
        release.set()
        holder.join(60)
    assert answer.status_code == 403 and holder_saw["release"], answer.get_json()


@pytest.mark.parametrize(("target", "label"), [("alice", "user alice"),
                                               ("team@alice", "namespace team@alice")])
def test_an_unfinished_upload_counts_against_a_later_post_images(
        client, runner, alice, upload, qcow2_bytes, target, label):
    """From its creation on, until it ends, a tus upload counts as an image of its
    Upload-Length, for its owner and its root namespace; expired, it counts no more."""
    size = len(qcow2_bytes)
    ensure_namespace(alice.user, ("team",))
    set_quota(runner, target, bytes=size + size // 2)
    path = path_of(create(client, alice, size, name="coming", namespace="team/dev"))
    assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 204
    assert quota(runner, "show", target).output.splitlines()[2] == "images: 1 used, no limit"
    refused = upload(alice, "now", namespace="team")
    assert (refused.status_code, refused.get_json()) == (403, {
        "message": f"Quota exceeded: {label} may keep {size + size // 2} bytes; {size} in "
                   f"use, and this image is {size} bytes"})
    Upload.update(expires_at=utcnow()).execute()  # its time has come
    assert upload(alice, "now", namespace="team").status_code == 201


def test_a_collaborators_unfinished_upload_counts_for_the_namespaces_owner(
        client, runner, alice, bob):
    """As for an image: the owner pays, not the collaborator who sends it."""
    runner.invoke(args=["namespace", "create", "team", "--owner", "alice"])
    runner.invoke(args=["namespace", "add-collaborator", "team@alice", "bob"])
    path_of(create(client, bob, 1000, name="from-bob", namespace="team@alice"))
    assert quota(runner, "show", "alice").output.splitlines()[1:] == [
        "bytes: 1000 used (1000), no limit", "images: 1 used, no limit"]
    assert quota(runner, "show", "bob").output.splitlines()[1:] == [
        "bytes: 0 used (0), no limit", "images: 0 used, no limit"]


@pytest.mark.parametrize("kind", ["bytes", "images"])
def test_of_two_racing_creations_that_together_pass_the_quota_one_wins(
        app, runner, alice, qcow2_bytes, monkeypatch, kind):
    """Both pass the early check before either writes its row (each waits there for the
    other); the check in the transaction that writes the row lets one in (SQLite and
    PostgreSQL, by the app fixture)."""
    size = len(qcow2_bytes)
    set_quota(runner, "alice", **{"bytes": size * 3 // 2} if kind == "bytes" else {"images": 1})
    both_checked = threading.Barrier(2)

    def checked_early(plan, length):
        check_quota_early(plan, length)
        both_checked.wait(30)

    monkeypatch.setattr(tusuploads, "check_quota_early", checked_early)
    answers = [None, None]

    def make(i):
        answers[i] = create(app.test_client(), alice, size, name=f"racer{i}")

    threads = [threading.Thread(target=make, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(a.status_code for a in answers) == [201, 403], [a.get_json() for a in answers]
    loser = next(a for a in answers if a.status_code == 403)
    assert loser.get_json()["message"].startswith("Quota exceeded: user alice may keep")
    assert Upload.select().count() == 1


def test_a_finished_upload_counts_once_by_its_image(client, runner, alice, qcow2_bytes):
    """At the end the upload is done before the quotas are checked again: what counted as
    pending counts as the image instead, not both (a quota of exactly the file takes it)."""
    size = len(qcow2_bytes)
    set_quota(runner, "alice", bytes=size, images=1)
    _, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000])
    assert last.status_code == 204, last.get_json()
    assert quota(runner, "show", "alice").output.splitlines()[1:] == [
        f"bytes: {size} used ({size // 1024}K), limit {size} ({size // 1024}K)",
        "images: 1 used, limit 1"]


def test_a_quota_passed_by_the_end_refuses_the_image_and_ends_the_upload(
        client, runner, alice, app, qcow2_bytes):
    """A quota lowered while the upload was on its way: the last piece is refused with the
    403 of the quota, and the upload is gone with its bytes."""
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:70_000]).status_code == 204
    set_quota(runner, "alice", images=0)
    before = scrape(client)
    last = send(client, alice, path, 70_000, qcow2_bytes[70_000:])
    assert (last.status_code, last.get_json()) == (403, {
        "message": "Quota exceeded: user alice may keep 0 images; 0 in use"})
    assert head(client, alice, path).status_code == 404
    assert Image.select().count() == 0 and uploads_folder(app) == []
    assert grown(before, scrape(client))[uploads("quota_images")] == 1


# --- metrics and the audit log -----------------------------------------------------------


def test_a_tus_upload_is_counted_once_when_it_ends_with_every_byte_received(
        client, alice, qcow2_bytes, tmp_path):
    """Stored, or refused at its creation, by its header or at its end: one upload each.
    A piece refused without ending the upload (a wrong offset, a checksum) counts none, nor
    does the last answer asked for again; every piece's bytes count as they are read."""
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    hostile += bytes(200_000 - len(hostile))
    refused_at_end = sample_images.zeroed_refcounts(tmp_path).read_bytes()
    before = scrape(client)

    path, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000])
    assert last.status_code == 204
    assert send(client, alice, path, len(qcow2_bytes), b"").status_code == 204  # asked again
    assert create(client, alice, 1000, name="no spaces").status_code == 400
    _, last = upload_in_pieces(client, alice, hostile, [], name="hostile")
    assert last.status_code == 400
    path = path_of(create(client, alice, len(refused_at_end), name="broken"))
    assert send(client, alice, path, 0, refused_at_end[:100_000]).status_code == 204
    assert send(client, alice, path, 0, b"again").status_code == 409
    assert send(client, alice, path, 100_000, refused_at_end[100_000:],
                **{"Upload-Checksum": checksum("sha1", b"other bytes")}).status_code == 460
    assert send(client, alice, path, 100_000, refused_at_end[100_000:]).status_code == 400

    found = grown(before, scrape(client))
    assert {key: value for key, value in found.items()
            if key[0] in ("imagestore_uploads_total", RECEIVED[0])} == {
        uploads("stored"): 1, uploads("name"): 1, uploads("backing_file"): 1,
        uploads("corrupt"): 1,
        RECEIVED: len(qcow2_bytes) + 65_536 + len(refused_at_end) + len(refused_at_end) - 100_000,
    }


def test_a_tus_upload_writes_the_audit_lines_of_post_images(make_app, make_account,
                                                             qcow2_bytes, tmp_path):
    """`upload` with the image (status 204, the answer to its last piece), or `refuse` with
    the name and namespace of its metadata and the rule; nothing for a piece that does not
    end it."""
    log = tmp_path / "audit.log"
    client = make_app(AUDIT_LOG=str(log)).test_client()
    alice = make_account("alice")
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    hostile += bytes(200_000 - len(hostile))

    path, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000], name="go-dev",
                                  namespace="djinn/ci")
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert send(client, alice, path, 0, b"late").status_code == 409
    assert create(client, alice, 1000, name="no spaces", namespace="djinn").status_code == 400
    _, refused = upload_in_pieces(client, alice, hostile, [], name="hostile", namespace="djinn")
    assert refused.status_code == 400

    by_alice = {"user": "alice", "token_id": token_id(alice), "client": "127.0.0.1"}
    no_image = dict.fromkeys(("image_id", "sha256", "bytes"))
    assert without_time(lines_of(log)) == [
        {"action": "upload", **by_alice, "image_id": image["id"], "name": "go-dev",
         "namespace": "djinn/ci@alice", "sha256": image["sha256"], "bytes": len(qcow2_bytes),
         "status": 204},
        {"action": "refuse", **by_alice, **no_image, "name": "no spaces", "namespace": "djinn",
         "status": 400, "rule": "name"},
        {"action": "refuse", **by_alice, **no_image, "name": "hostile", "namespace": "djinn",
         "status": 400, "rule": "backing_file"},
    ]


def test_an_upload_whose_bytes_were_lost_ends_counted(client, alice, app, qcow2_bytes):
    """The store lost the bytes (a machine that crashed before its cache was written): the
    next piece is 410, the upload is gone, and it is counted as ended, not stored."""
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:70_000]).status_code == 204
    [name] = uploads_folder(app)
    os.truncate(Path(local_store(app).root) / ".uploads" / name, 1000)
    before = scrape(client)
    answer = send(client, alice, path, 70_000, qcow2_bytes[70_000:])
    assert (answer.status_code, answer.get_json()) == (410, {
        "message": "Gone: the upload's bytes were lost; start a new one"})
    assert head(client, alice, path).status_code == 404
    assert grown(before, scrape(client))[uploads("status_410")] == 1


def test_a_sha256_that_does_not_match_is_counted_as_such(client, alice, qcow2_bytes):
    """By tus (the metadata's sha256) and by POST /images (the query's): sha256_mismatch."""
    before = scrape(client)
    _, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000], sha256="0" * 64)
    assert last.status_code == 400
    assert client.post("/images?name=posted&sha256=" + "0" * 64, data=qcow2_bytes,
                       headers=alice.headers).status_code == 400
    assert grown(before, scrape(client))[uploads("sha256_mismatch")] == 2
