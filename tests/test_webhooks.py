"""Webhooks in Djinn's format: each images event of a namespace and its children is POSTed,
signed over its exact body, to the namespace's webhooks, in the background, tried again
until the receiver takes it, each try recorded (`flask --app app webhook deliveries ID`).

The receivers are real HTTP servers on loopback (http.server in a thread).
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from conftest import free_port, needs_postgres, server_with_account, start_server, stop_server
from test_metrics import grown, scrape

import jobs
from models import Job, WebhookDelivery, utcnow

SECRET = "a-secret-of-the-receiver"
DEADLINE = 60  # seconds: generous, for a busy machine


class Receiver:
    """A webhook receiver on loopback: it records each POST (headers, exact body, whether
    the signature matched), answers `statuses` one after another (then 200), and can hang
    (answer nothing until the test ends) or trickle its answer a byte at a time."""

    def __init__(self, statuses=(), hang=False, trickle=False, secret=SECRET):
        self.statuses, self.hang, self.trickle, self.secret = list(statuses), hang, trickle, secret
        self.requests = []
        self.arrived = threading.Condition()
        self.released = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/images?team=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler_class(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.answer(self)

            def log_message(self, *args):
                pass

        return Handler

    def signed(self, headers, body):
        """Whether the signature header is the HMAC-SHA256 of body with our secret."""
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(headers.get("X-Djinn-CI-Signature", ""), expected)

    def answer(self, handler):
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        with self.arrived:
            self.requests.append({"path": handler.path, "headers": dict(handler.headers),
                                  "body": body, "signed": self.signed(handler.headers, body)})
            status = self.statuses.pop(0) if self.statuses else 200
            self.arrived.notify_all()
        if self.hang:
            self.released.wait(DEADLINE)
            return
        if self.trickle:
            for byte in b"HTTP/1.1 200 OK\r\n":
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                if self.released.wait(0.1):  # in all, slower than a whole try may take
                    return
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, count):
        """Wait until count requests have come; the requests."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, DEADLINE), \
                f"{len(self.requests)} requests came, not {count}"
            return list(self.requests)

    def events(self):
        """(action, image id) of each request, in the order they came."""
        bodies = [json.loads(r["body"]) for r in self.requests]
        return [(b["action"], b["image"]["id"]) for b in bodies]

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    """Start receivers (keyword arguments of Receiver); each is closed after the test."""
    made = []

    def make(**options):
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def hook(runner):
    """Make a namespace (and its owner's user, if new) with a webhook to url; its id."""

    def make(ref, url, secret=SECRET):
        path, owner = ref.split("@")
        runner.invoke(args=["user", "create", owner, f"{owner}@example.com"])
        runner.invoke(args=["namespace", "create", path, "--owner", owner])
        result = runner.invoke(args=["webhook", "create", ref, url, "--secret", secret])
        assert result.exit_code == 0, result.output
        return int(result.output)

    return make


def deliveries(runner, webhook_id):
    """The lines of `webhook deliveries ID`, each split at its tabs, the time left out."""
    result = runner.invoke(args=["webhook", "deliveries", str(webhook_id)])
    assert result.exit_code == 0, result.output
    return [line.split("\t")[1:] for line in result.output.splitlines()]


def test_an_upload_is_posted_signed_over_its_exact_body(alice, upload, hook, receiver, runner):
    team = receiver()
    webhook_id = hook("team@alice", team.url)
    created = upload(alice, name="alpine", namespace="team")
    assert created.status_code == 201
    assert team.requests == []  # sent in the background, never within the request
    assert jobs.run_due_jobs() == 1
    (sent,) = team.wait_for(1)
    assert sent["path"] == "/hooks/images?team=1"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["X-Djinn-CI-Event"] == "images"
    assert sent["headers"]["X-Djinn-CI-Hook-ID"] == str(webhook_id)
    assert re.fullmatch(r"[0-9a-f]{32}", sent["headers"]["X-Imagestore-Event-ID"])
    assert sent["signed"]
    assert json.loads(sent["body"]) == {"action": "created", "image": created.json}
    assert deliveries(runner, webhook_id) == [["created", "1", "200"]]


def test_events_reach_the_webhooks_of_the_namespace_and_its_parents(
        alice, upload, hook, receiver):
    root, child, sibling = receiver(), receiver(), receiver()
    hook("team@alice", root.url)
    hook("team/sub@alice", child.url)
    hook("other@alice", sibling.url)
    deep = upload(alice, name="deep", namespace="team/sub/deep").json
    top = upload(alice, name="top", namespace="team").json
    upload(alice, name="loose")  # outside namespaces: no webhook hears of it
    assert jobs.run_due_jobs() == 3
    assert sorted(root.events()) == [("created", deep["id"]), ("created", top["id"])]
    assert child.events() == [("created", deep["id"])]
    assert sibling.events() == []


def test_a_deleted_event_shows_the_image_as_it_was(alice, client, upload, hook, receiver):
    team = receiver()
    hook("team@alice", team.url)
    image = upload(alice, name="gone", namespace="team").json
    assert client.delete(f"/images/{image['id']}", headers=alice.headers).status_code == 204
    assert jobs.run_due_jobs() == 2
    sent = team.wait_for(2)
    created, deleted = (json.loads(r["body"]) for r in sent)
    assert deleted == {"action": "deleted", "image": image}
    assert created["image"] == image
    assert len({r["headers"]["X-Imagestore-Event-ID"] for r in sent}) == 2  # two events


def test_a_receiver_that_fails_three_times_gets_the_event_at_the_fourth_try(
        make_app, alice, upload, hook, receiver, runner):
    make_app(WEBHOOK_BACKOFF=(0.0, 0.0, 0.0, 0.0, 0.0))  # the waits, shortened for the test
    flaky = receiver(statuses=(500, 502, 503))
    webhook_id = hook("team@alice", flaky.url)
    upload(alice, name="alpine", namespace="team")
    assert jobs.run_due_jobs() == 4
    sent = flaky.wait_for(4)
    assert len({r["body"] for r in sent}) == 1 and all(r["signed"] for r in sent)
    # one event: the receiver can tell the fourth try for a repeat of the first
    assert len({r["headers"]["X-Imagestore-Event-ID"] for r in sent}) == 1
    assert deliveries(runner, webhook_id) == [
        ["created", "1", "500"], ["created", "2", "502"], ["created", "3", "503"],
        ["created", "4", "200"]]
    assert Job.select().count() == 0


def test_after_the_last_try_the_delivery_job_is_kept_as_failed(
        make_app, alice, upload, hook, receiver, runner):
    make_app(WEBHOOK_BACKOFF=(0.0, 0.0))
    down = receiver(statuses=(500,) * 10)
    webhook_id = hook("team@alice", down.url)
    upload(alice, name="alpine", namespace="team")
    assert jobs.run_due_jobs() == 3
    assert [line[1:] for line in deliveries(runner, webhook_id)] == [
        ["1", "500"], ["2", "500"], ["3", "500"]]
    (line,) = runner.invoke(args=["job", "list"]).output.splitlines()
    assert line.split("\t")[1:4] == ["webhook", "failed", "3"]
    assert line.endswith(f"webhook {webhook_id}: HTTP 500")


def test_each_try_is_counted_in_metrics_as_delivered_failed_or_given_up(
        make_app, client, alice, upload, hook, receiver):
    """Three tries at most: one receiver takes the event at its second try, the other
    never (its last failed try is the one given up)."""
    make_app(WEBHOOK_BACKOFF=(0.0, 0.0))
    flaky, down = receiver(statuses=(500,)), receiver(statuses=(500,) * 10)
    hook("team@alice", flaky.url)
    hook("team@alice", down.url)
    before = scrape(client)
    upload(alice, name="alpine", namespace="team")
    assert jobs.run_due_jobs() == 5
    tries = {key[1]: value for key, value in grown(before, scrape(client)).items()
             if key[0] == "imagestore_webhook_deliveries_total"}
    assert tries == {(("outcome", "delivered"),): 1, (("outcome", "failed"),): 3,
                     (("outcome", "gave_up"),): 1}


def test_a_hanging_receiver_costs_a_timeout_and_frees_the_thread(
        make_app, alice, upload, hook, receiver, runner, job_threads):
    """One job thread: the delivery queued after the hanging one still arrives."""
    app = make_app(WEBHOOK_TIMEOUT=0.5, JOB_THREADS=1, WEBHOOK_BACKOFF=(3600.0,))
    hanging, fine = receiver(hang=True), receiver()
    slow_id = hook("slow@alice", hanging.url)
    hook("fast@alice", fine.url)
    upload(alice, name="first", namespace="slow")
    upload(alice, name="second", namespace="fast")
    job_threads(app)
    fine.wait_for(1)
    hanging.wait_for(1)
    assert deliveries(runner, slow_id) == [["created", "1", "timed out after 0.5 s"]]


@pytest.mark.slow  # a try of 1.5 s by design
def test_a_receiver_trickling_its_answer_is_cut_off(
        make_app, alice, upload, hook, receiver, runner):
    """Each byte comes within the timeout; the whole try may take three times it."""
    make_app(WEBHOOK_TIMEOUT=0.5, WEBHOOK_BACKOFF=(3600.0,))
    trickling = receiver(trickle=True)
    webhook_id = hook("team@alice", trickling.url)
    upload(alice, name="alpine", namespace="team")
    assert jobs.run_due_jobs() == 1
    assert deliveries(runner, webhook_id) == [
        ["created", "1", "timed out after 1.5 s in all"]]


def test_a_refused_connection_is_recorded_and_tried_again(make_app, alice, upload, hook, runner):
    make_app(WEBHOOK_BACKOFF=(3600.0,))
    webhook_id = hook("team@alice", f"http://127.0.0.1:{free_port()}/hooks")  # nobody there
    upload(alice, name="alpine", namespace="team")
    assert runner.invoke(args=["job", "run"]).output == "ran 1 jobs\n"
    assert deliveries(runner, webhook_id) == [["created", "1", "connection refused"]]
    assert Job.get().state == "pending"


def test_an_event_for_a_deleted_webhook_is_dropped(alice, upload, hook, receiver, runner):
    team = receiver()
    webhook_id = hook("team@alice", team.url)
    upload(alice, name="alpine", namespace="team")
    assert runner.invoke(args=["webhook", "delete", str(webhook_id)]).output == \
        f"deleted {webhook_id}\n"
    assert jobs.run_due_jobs() == 1
    assert team.requests == []
    assert Job.select().count() == 0 and WebhookDelivery.select().count() == 0


def old_record(webhook_id, days):
    """A delivery record of a try made days ago."""
    return WebhookDelivery.create(webhook=webhook_id, event="e" * 32, action="created",
                                  try_number=1, status=200,
                                  created_at=utcnow() - timedelta(days=days))


def test_delivery_records_are_kept_for_job_history(make_app, alice, upload, hook, receiver,
                                                   runner):
    """A try removes its webhook's records past JOB_HISTORY; `flask sweep` everyone's."""
    app = make_app(JOB_HISTORY=7 * 86400.0)
    team, other = receiver(), receiver()
    team_id, other_id = hook("team@alice", team.url), hook("other@alice", other.url)
    expired, recent = old_record(team_id, days=8), old_record(team_id, days=6)
    untouched = old_record(other_id, days=8)
    upload(alice, name="alpine", namespace="team")
    assert jobs.run_due_jobs() == 1
    kept = {d.id for d in WebhookDelivery.select()}
    assert expired.id not in kept and {recent.id, untouched.id} <= kept and len(kept) == 3
    result = app.test_cli_runner().invoke(args=["sweep"])
    assert result.output.splitlines()[-1] == \
        "removed 0 failed jobs and 1 webhook delivery records older than JOB_HISTORY"
    assert WebhookDelivery.get_or_none(WebhookDelivery.id == untouched.id) is None
    assert len(deliveries(runner, team_id)) == 2  # the recent one and the new try


def test_webhook_commands(runner, hook):
    first = hook("team@alice", "https://ci.example.com/hook")
    second = hook("team@alice", "http://10.0.0.5:8080/images")
    listing = runner.invoke(args=["webhook", "list", "team@alice"]).output.splitlines()
    assert [line.split("\t")[:2] for line in listing] == [
        [str(first), "https://ci.example.com/hook"], [str(second), "http://10.0.0.5:8080/images"]]
    assert all(line.split("\t")[2].endswith("Z") for line in listing)
    assert SECRET not in "\n".join(listing)
    assert deliveries(runner, first) == []


@pytest.mark.parametrize(("args", "message"), [
    (["create", "nothing@alice", "http://ci/hook", "--secret", "s"], "no namespace"),
    (["create", "team", "http://ci/hook", "--secret", "s"], "name the owner: PATH@OWNER"),
    (["create", "team@alice", "ftp://ci/hook", "--secret", "s"], "not an http:// or https://"),
    (["create", "team@alice", "http://ci:port/hook", "--secret", "s"], "Port could not be cast"),
    (["create", "team@alice", "http://ci/hook", "--secret", ""], "needs a secret"),
    (["delete", "99"], "no webhook with id 99"),
    (["deliveries", "99"], "no webhook with id 99"),
])
def test_webhook_commands_refuse_what_they_cannot_do(runner, hook, args, message):
    hook("team@alice", "http://ci/hook")
    result = runner.invoke(args=["webhook", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_the_default_schedule_keeps_the_contract(app):
    """At least 5 tries over at least 10 minutes, the 3rd within 3 minutes of the 1st."""
    waits = app.config["WEBHOOK_BACKOFF"]
    assert len(waits) + 1 >= 5
    assert waits[0] + waits[1] <= 180
    assert sum(waits) >= 600


# End to end: a real gunicorn from the Procfile, two workers, each with its job threads.
FAST = {"JOB_LEASE": "2", "JOB_POLL_INTERVAL": "1", "WEBHOOK_BACKOFF": "0.2,0.2,0.2,0.2,0.2"}


def call(method, url, headers, body=None):
    """(status, JSON body or None) of one request to a live server."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
    try:
        connection.request(method, f"{parts.path}?{parts.query}", body, headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


def hook_on(server, owner, url):
    """A namespace `team` of owner's on a live server, with a webhook to url."""
    server.flask("namespace", "create", "team", "--owner", owner)
    return server.flask("webhook", "create", f"team@{owner}", url, "--secret", SECRET)


def test_gunicorn_delivers_created_and_deleted(tmp_path, receiver, qcow2_bytes):
    team = receiver()
    with server_with_account(tmp_path, "alice", FAST) as server:
        webhook_id = hook_on(server, "alice", team.url)
        status, image = call("POST", f"{server.url}/images?name=alpine&namespace=team",
                             server.headers, qcow2_bytes)
        assert status == 201
        assert call("DELETE", image["url"], server.headers) == (204, None)
        team.wait_for(2)
        lines = server.flask("webhook", "deliveries", webhook_id).splitlines()
    assert server.process.returncode == 0  # the job threads let the workers exit cleanly
    assert "Traceback" not in server.log_text()
    assert sorted(json.loads(r["body"])["action"] for r in team.requests) == [
        "created", "deleted"]
    assert all(r["signed"] and json.loads(r["body"])["image"] == image for r in team.requests)
    assert sorted(line.split("\t")[1:] for line in lines) == [
        ["created", "1", "200"], ["deleted", "1", "200"]]


def test_gunicorn_loses_no_event_when_its_workers_are_killed(tmp_path, receiver, qcow2_bytes):
    """The first try hangs at the receiver while every worker is killed (kill -9): the new
    workers take the lapsed claim over and send the event again."""
    team = receiver(hang=True)
    with server_with_account(tmp_path, "alice", FAST) as server:
        hook_on(server, "alice", team.url)
        status, image = call("POST", f"{server.url}/images?name=alpine&namespace=team",
                             server.headers, qcow2_bytes)
        assert status == 201
        team.wait_for(1)  # a worker is sending it, and waits for the answer
        workers = server.worker_pids()
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        team.hang = False
        team.wait_for(2)
    first, again = team.requests[:2]
    assert first["body"] == again["body"] and again["signed"]
    assert json.loads(again["body"]) == {"action": "created", "image": image}


@needs_postgres
def test_two_instances_on_one_postgresql_deliver_each_event_once(pg_schemas, tmp_path,
                                                                 receiver, qcow2_bytes):
    """Both instances' job threads look for work five times a second; the receiver counts
    what it gets twice."""
    team = receiver()
    env = {**FAST, "DATABASE_URL": pg_schemas.new(), "JOB_POLL_INTERVAL": "0.2",
           "SECRET_KEY": SECRET * 2}
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(start_server(tmp_path / name, env))
        headers = servers[0].account("dana")
        hook_on(servers[0], "dana", team.url)
        for n in range(8):
            server = servers[n % 2]
            status, image = call("POST", f"{server.url}/images?name=i{n}&namespace=team",
                                 headers, qcow2_bytes)
            assert status == 201
            assert call("DELETE", image["url"], headers) == (204, None)
        team.wait_for(16)
        wait_until_no_jobs(servers[1])
    finally:
        for server in servers:
            stop_server(server)
    events = team.events()
    assert len(set(events)) == 16
    assert len(events) == 16, f"{len(events) - 16} events came twice"


def wait_until_no_jobs(server):
    """Wait until the server's job table is empty: every delivery has been settled."""
    deadline = time.monotonic() + DEADLINE
    while server.flask("job", "list"):
        assert time.monotonic() < deadline, server.flask("job", "list")
