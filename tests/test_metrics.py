"""GET /metrics: what is counted (requests by route, uploads by outcome, downloads by way,
bytes, stored images), the rule names of refusals, METRICS_TOKEN, and, over a real gunicorn
with several workers, figures that are the sum of all of them and survive their restart."""

import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, http_call, make_qcow2, make_rows, server_with_account
from image_fixtures import HOSTILE
from peewee import SqliteDatabase
from prometheus_client import generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.exceptions import RequestEntityTooLarge

import image_changes
import image_stats
import metrics
import qcow2
import queries
from errors import ApiError, ValidationError
from models import db
from qcow2 import ImageRefused, inspect_qcow2
from quotas import QuotaExceeded
from refusals import refusal_rule
from storage import StorageUnavailable
from uploads import cut_off, too_large

METRICS_TOKEN = "metrics-token-of-the-tests-0123456789"


def figures(text):
    """Every sample of a /metrics text: {(name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def figure(found, name, **labels):
    """One sample's value; 0 for a series not (yet) there, as Prometheus reads it."""
    return found.get((name, tuple(sorted(labels.items()))), 0)


def scrape(client, headers=None):
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    return figures(response.get_data(as_text=True))


def grown(before, after):
    """The counts that changed between two scrapes, by sample: the histogram's _bucket and
    _sum aside (they are times), and the /metrics route's own."""
    return counts({key: after[key] - before.get(key, 0) for key in after
                   if after[key] != before.get(key, 0) and ("route", "/metrics") not in key[1]})


def counts(found):
    """The samples of found that count things (the durations' histogram aside)."""
    return {key: value for key, value in found.items()
            if not key[0].startswith("imagestore_http_request_duration_seconds")}


def requests(route, method, status):
    """The key of a count of requests."""
    return ("imagestore_http_requests_total",
            (("method", method), ("route", route), ("status", str(status))))


def uploads(outcome):
    return ("imagestore_uploads_total", (("outcome", outcome),))


def downloads(via, status):
    return ("imagestore_downloads_total", (("status", str(status)), ("via", via)))


RECEIVED = ("imagestore_received_bytes_total", ())
SENT = ("imagestore_sent_bytes_total", ())


# --- the rule names of refusals ----------------------------------------------------------

CASES = {case.id: case.values for case in HOSTILE}
RULE_OF_CASE = {
    "empty": "not_qcow2", "vmdk": "not_qcow2", "gzip": "not_qcow2",
    "qcow-v1": "unsupported_version", "truncated-header": "truncated",
    "header-length-small": "malformed_header", "size-not-sectors": "malformed_header",
    "l1-size-absurd": "malformed_tables", "snapshots-nowhere": "malformed_tables",
    "backing-path": "backing_file", "backing-format-extension": "backing_file",
    "data-file": "data_file", "aes": "encrypted", "corrupt-bit": "corrupt",
    "truncated-body": "corrupt", "dirty-bit": "dirty",
    "unknown-incompatible-bit": "unknown_features", "exabyte": "virtual_size",
}


@pytest.mark.parametrize(("case", "rule"), RULE_OF_CASE.items())
def test_a_refused_file_names_the_rule_it_failed(case_image, case, rule):
    maker, _, _, limit = CASES[case]
    with pytest.raises(ImageRefused) as refused:
        inspect_qcow2(str(case_image(maker)), limit)
    assert refused.value.rule == rule


def test_every_refusal_of_qcow2_uses_a_listed_rule_name():
    source = Path(qcow2.__file__).read_text()
    used = re.findall(r"_refuse\(\s*\"([a-z0-9_]+)\"", source)
    calls = re.findall(r"\b_refuse\(", source)
    assert len(used) == len(calls) - 1  # every call names a rule; the other one is its def
    assert set(used) == set(qcow2.REFUSAL_RULES)


def raised_while_handling(refusal):
    """The ValidationError api.py raises for a refused file (as it does: in the except)."""
    try:
        raise refusal
    except ImageRefused:
        try:
            raise ValidationError("file", str(refusal)) from None
        except ValidationError as error:
            return error


@pytest.mark.parametrize(("error", "rule"), [
    (ImageRefused("File not a valid QCOW2 image: …", "encrypted"), "encrypted"),
    (raised_while_handling(ImageRefused("…", "backing_file")), "backing_file"),
    (ValidationError("name", "Name field required"), "name"),
    (ValidationError("name", image_changes.NAME_TAKEN), "name_taken"),
    (ValidationError("namespace", "Namespace permission denied"), "namespace"),
    (ValidationError("file", "File field required in a multipart/form-data body"), "no_file"),
    (ApiError(411, "Length Required"), "length_required"),
    (too_large(1000), "too_large"),
    (RequestEntityTooLarge(), "too_large"),
    (ApiError(415, "Content-Encoding not supported"), "content_encoding"),
    (ApiError(408, "Request Timeout"), "too_slow"),
    (cut_off(), "broken_body"),
    (ApiError(507, "Insufficient Storage"), "disk_full"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (StorageUnavailable("s3 down", reason="the bucket does not answer"), "store_unavailable"),
    (ApiError(409, "Conflict"), "status_409"),
    (QuotaExceeded("Quota exceeded: user alice may keep 1000 bytes; …", "user alice", "bytes"),
     "quota_bytes"),
    (QuotaExceeded("Quota exceeded: namespace team@alice may keep 1 image; 1 in use",
                   "namespace team@alice", "images"), "quota_images"),
    (RuntimeError("a bug"), "error"),
])
def test_an_upload_error_names_its_rule(error, rule):
    assert refusal_rule(error) == rule


# --- what is counted, through the app ----------------------------------------------------

def test_uploads_are_counted_by_outcome_with_the_bytes_received(app, client, alice, upload,
                                                                qcow2_bytes):
    before = scrape(client)
    assert upload(alice, name="a").status_code == 201
    assert upload(alice, name="b").status_code == 201
    assert upload(alice, name="a").status_code == 400  # the name is taken: nothing read
    assert upload(alice, name="c", data=b"not an image").status_code == 400
    assert upload(alice, name="bad name!").status_code == 400
    app.config["MAX_IMAGE_SIZE"] = 10
    assert upload(alice, name="big").status_code == 413  # from Content-Length: nothing read
    assert grown(before, scrape(client)) == {
        uploads("stored"): 2, uploads("name_taken"): 1, uploads("not_qcow2"): 1,
        uploads("name"): 1, uploads("too_large"): 1,
        RECEIVED: 2 * len(qcow2_bytes) + len(b"not an image"),
        requests("/images", "POST", 201): 2, requests("/images", "POST", 400): 3,
        requests("/images", "POST", 413): 1,
        ("imagestore_stored_images", ()): 2,
        ("imagestore_stored_image_bytes", ()): 2 * len(qcow2_bytes),
    }


def test_requests_are_counted_by_url_rule_never_by_path(client, alice):
    before = scrape(client)
    for image_id in (1, 2, 3):
        assert client.get(f"/images/{image_id}", headers=alice.headers).status_code == 404
    assert client.get("/no/such/place").status_code == 404
    assert client.open("/images", method="BREW").status_code == 405
    assert grown(before, scrape(client)) == {
        requests("/images/<int:image_id>", "GET", 404): 3,
        requests("unmatched", "GET", 404): 1,
        requests("unmatched", "other", 405): 1,
    }


def test_downloads_are_counted_by_way_and_status(client, alice, upload, qcow2_bytes):
    image = upload(alice, name="disk").json
    disk = {**alice.headers, "Accept": "application/octet-stream"}
    path = f"/images/{image['id']}"
    link = client.post(f"{path}/links", headers=alice.headers).json["url"]
    link_path = link.removeprefix("http://localhost")
    before = scrape(client)
    assert client.get(path, headers=disk).status_code == 200
    assert client.get(path, headers={**disk, "Range": "bytes=0-99"}).status_code == 206
    assert client.get(path, headers={**disk, "If-None-Match": f'"{image["sha256"]}"'}
                      ).status_code == 304
    assert client.head(path, headers=disk).status_code == 200  # reads no file: not counted
    assert client.get(path, headers=alice.headers).status_code == 200  # JSON: not a download
    assert client.get(link_path).status_code == 200
    assert client.get(link_path, headers={"Range": "bytes=10-19"}).status_code == 206
    changes = grown(before, scrape(client))
    assert {key: value for key, value in changes.items()
            if key[0].startswith(("imagestore_downloads", "imagestore_sent"))} == {
        downloads("file", 200): 1, downloads("file", 206): 1, downloads("file", 304): 1,
        downloads("link", 200): 1, downloads("link", 206): 1,
        SENT: 2 * len(qcow2_bytes) + 100 + 10,
    }


def test_stored_images_follow_uploads_and_deletes_and_agree_with_a_recount(
        app, client, alice, upload, qcow2_bytes):
    ids = [upload(alice, name=f"i{n}").json["id"] for n in range(3)]
    assert client.delete(f"/images/{ids[0]}", headers=alice.headers).status_code == 204
    found = scrape(client)
    assert figure(found, "imagestore_stored_images") == 2
    assert figure(found, "imagestore_stored_image_bytes") == 2 * len(qcow2_bytes)
    with app.app_context():
        image_stats.recount()
        assert image_stats.read() == (2, 2 * len(qcow2_bytes))


def test_a_delete_that_lost_the_race_takes_nothing_away(app, alice, upload, qcow2_bytes):
    image_id = upload(alice, name="twice").json["id"]
    with app.app_context():
        image = queries.find_image(image_id)
        image_changes.delete_image(image, app.extensions["storage"])
        image_changes.delete_image(image, app.extensions["storage"])  # finds no row to delete
        assert image_stats.read() == (0, 0)


def test_a_recount_sets_the_totals_from_the_rows(app, alice):
    with app.app_context():
        make_rows(alice, 5)  # rows written without image_changes: the totals do not see them
        assert image_stats.read() == (0, 0)
        image_stats.recount()  # as every start does
        assert image_stats.read() == (5, 5)


def test_durations_are_kept_by_route_and_method(client, alice):
    before = scrape(client)
    for _ in range(2):
        assert client.get("/images", headers=alice.headers).status_code == 200
    after = scrape(client)
    series = {"method": "GET", "route": "/images"}
    name = "imagestore_http_request_duration_seconds"
    assert figure(after, f"{name}_count", **series) - figure(before, f"{name}_count",
                                                           **series) == 2
    buckets = [figure(after, f"{name}_bucket", **series, le=le)
               for le in ("0.005", "0.025", "0.1", "0.5", "2.5", "10.0", "60.0", "300.0", "+Inf")]
    assert buckets == sorted(buckets) and buckets[-1] == figure(after, f"{name}_count", **series)


def row_version():
    """Something that changes whenever the totals' row is written: SQLite's count of the
    connection's changes, PostgreSQL's row version (xmin)."""
    if isinstance(db.obj, SqliteDatabase):
        return db.connection().total_changes
    return db.execute_sql("SELECT xmin::text FROM imagestats").fetchone()[0]


def test_a_recount_that_finds_the_totals_right_writes_nothing(app, alice, upload):
    """So that a start on a full disk, which can still read, is not stopped by it."""
    assert upload(alice, name="kept").status_code == 201
    with app.app_context(), db.connection_context():
        before = row_version()
        image_stats.recount()
        assert row_version() == before


def test_imports_and_webhook_deliveries_are_counted_by_outcome(client):
    before = scrape(client)
    metrics.count_import("stored")
    metrics.count_import("http_error")
    metrics.count_webhook_delivery("delivered")
    metrics.count_webhook_delivery("failed")
    metrics.count_webhook_delivery("Failed: connection refused to 10.0.0.1")  # not a name
    assert grown(before, scrape(client)) == {
        ("imagestore_imports_total", (("outcome", "stored"),)): 1,
        ("imagestore_imports_total", (("outcome", "http_error"),)): 1,
        ("imagestore_webhook_deliveries_total", (("outcome", "delivered"),)): 1,
        ("imagestore_webhook_deliveries_total", (("outcome", "failed"),)): 1,
        ("imagestore_webhook_deliveries_total", (("outcome", "other"),)): 1,
    }


def test_metrics_are_prometheus_text_and_open_without_metrics_token(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE imagestore_uploads_total counter" in response.get_data(as_text=True)


def test_metrics_token_is_required_when_set(make_app, make_account):
    app = make_app(METRICS_TOKEN=METRICS_TOKEN)
    client = app.test_client()
    with app.app_context():
        api_token = make_account("alice").headers  # a user's token is not the metrics token
    for headers in ({}, {"Authorization": "Bearer wrong"}, api_token,
                    {"Authorization": f"Basic {METRICS_TOKEN}"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json == {"message": "Metrics need the bearer token METRICS_TOKEN"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for value in (f"Bearer {METRICS_TOKEN}", f"bearer  {METRICS_TOKEN} "):
        assert client.get("/metrics", headers={"Authorization": value}).status_code == 200


# --- every worker's files, added up ------------------------------------------------------

WORKER = """
import metrics
for status in (200, 404, 404):
    metrics.count_request("/images", "GET", status, 0.003)
metrics.count_request("/images/<int:image_id>", "DELETE", 204, 12.5)
metrics.count_upload("stored")
metrics.count_upload("not_qcow2")
metrics.count_download("link", 206, 100)
metrics.count_received(1234)
"""
STORED = {("imagestore_stored_images", ()): 7, ("imagestore_stored_image_bytes", ()): 70}


def run_worker(folder):
    """A process that counts WORKER's traffic into folder, as a gunicorn worker does."""
    subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, check=True,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})


def as_prometheus_client_reads(folder):
    """The figures of folder's files as prometheus_client's own reader adds them up."""
    return figures(generate_latest(MultiProcessCollector(None, path=str(folder))).decode())


def test_the_workers_files_add_up_as_prometheus_client_adds_them(tmp_path):
    run_worker(tmp_path)
    run_worker(tmp_path)
    ours = figures(metrics.render(7, 70, str(tmp_path)).decode())
    assert ours == as_prometheus_client_reads(tmp_path) | STORED
    assert figure(ours, "imagestore_http_requests_total", route="/images", method="GET",
                  status="404") == 4
    assert figure(ours, "imagestore_http_request_duration_seconds_bucket",
                  route="/images/<int:image_id>", method="DELETE", le="60.0") == 2

    # A value changed in place, and an entry added to a file read before: read again.
    path = str(sorted(tmp_path.glob("counter_*.db"))[0])
    worker = MmapedDict(path)
    stored = mmap_key("imagestore_uploads", "imagestore_uploads_total", ["outcome"],
                      ["stored"], metrics.UPLOADS._documentation)
    worker.write_value(stored, 5.0, 0.0)
    worker.write_value(mmap_key("imagestore_uploads", "imagestore_uploads_total", ["outcome"],
                                ["dirty"], metrics.UPLOADS._documentation), 1.0, 0.0)
    worker.close()
    ours = figures(metrics.render(7, 70, str(tmp_path)).decode())
    assert ours == as_prometheus_client_reads(tmp_path) | STORED
    assert figure(ours, "imagestore_uploads_total", outcome="stored") == 6
    assert figure(ours, "imagestore_uploads_total", outcome="dirty") == 1


# --- over a real gunicorn with several workers -------------------------------------------

WORKERS = 3


def wait_until(condition, seconds=60):
    """Poll condition until it is true (gunicorn gives no event for a new worker)."""
    deadline = time.monotonic() + seconds
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result, "the condition did not come true in time"
    return result


def live_counts(server):
    """The counts of a scrape of the server, on a new connection (any worker may answer);
    without the requests of /metrics and of /healthz (the harness asks that until the
    server answers, how often depends on the machine's speed)."""
    status, _, body = http_call(server, "GET", "/metrics",
                                {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200, body
    return counts({key: value for key, value in figures(body.decode()).items()
                   if not {("route", "/metrics"), ("route", "/healthz")} & set(key[1])})


def known_traffic(server, image):
    """Uploads stored and refused, downloads of each kind, a link and a delete; returns
    what the figures must then say."""
    data, headers = image.read_bytes(), server.headers
    disk = {**headers, "Accept": "application/octet-stream"}
    ids = []
    for name in ("a", "b", "c"):
        status, _, body = http_call(server, "POST", f"/images?name={name}", headers, data)
        assert status == 201, body
        ids.append(json.loads(body)["id"])
    assert http_call(server, "POST", "/images?name=a", headers, data)[0] == 400
    assert http_call(server, "POST", "/images?name=d", headers, b"not an image")[0] == 400
    # Refused from its Content-Length alone, so it is sent without its body.
    too_long = {**headers, "Content-Length": str(2 << 20)}
    assert http_call(server, "POST", "/images?name=e", too_long)[0] == 413
    path = f"/images/{ids[0]}"
    assert http_call(server, "GET", path, disk)[0] == 200
    assert http_call(server, "GET", path, {**disk, "Range": "bytes=0-99"})[0] == 206
    sha = hashlib.sha256(data).hexdigest()
    assert http_call(server, "GET", path, {**disk, "If-None-Match": f'"{sha}"'})[0] == 304
    status, _, body = http_call(server, "POST", f"{path}/links", headers)
    link = json.loads(body)["url"].removeprefix(server.url)
    assert http_call(server, "GET", link)[0] == 200
    assert http_call(server, "DELETE", f"/images/{ids[2]}", headers)[0] == 204
    return {
        uploads("stored"): 3, uploads("name_taken"): 1, uploads("not_qcow2"): 1,
        uploads("too_large"): 1, RECEIVED: 3 * len(data) + len(b"not an image"),
        downloads("file", 200): 1, downloads("file", 206): 1, downloads("file", 304): 1,
        downloads("link", 200): 1, SENT: 2 * len(data) + 100,
        requests("/images", "POST", 201): 3, requests("/images", "POST", 400): 2,
        requests("/images", "POST", 413): 1,
        requests("/images/<int:image_id>", "GET", 200): 1,
        requests("/images/<int:image_id>", "GET", 206): 1,
        requests("/images/<int:image_id>", "GET", 304): 1,
        requests("/images/<int:image_id>/links", "POST", 201): 1,
        requests("/links/<token>/<filename>", "GET", 200): 1,
        requests("/images/<int:image_id>", "DELETE", 204): 1,
        ("imagestore_stored_images", ()): 2, ("imagestore_stored_image_bytes", ()): 2 * len(data),
    }


def metrics_folder(pid):
    """The PROMETHEUS_MULTIPROC_DIR where the worker pid keeps its figures (a file of its
    counters is there from its start)."""
    [folder] = [folder for folder in Path(tempfile.gettempdir()).glob("imagestore-metrics-*")
                if (folder / f"counter_{pid}.db").exists()]
    return folder


def left_by_a_killed_master():
    """A metrics folder as a master that died without its on_exit leaves it (its pid, now
    of no process, in the name)."""
    process = subprocess.Popen(["true"])
    process.wait()
    assert not Path(f"/proc/{process.pid}").exists()
    folder = Path(tempfile.mkdtemp(prefix=f"imagestore-metrics-{process.pid}-"))
    (folder / "counter_1.db").write_bytes(b"")
    return folder


def audit_actions(server):
    """The actions of the audit lines in the server's standard error, in order."""
    return [json.loads(line)["action"] for line in server.log_text().splitlines()
            if line.startswith('{"time":')]


def test_figures_are_the_sum_of_all_workers_and_survive_their_restart(tmp_path):
    image = make_qcow2(tmp_path / "disk.qcow2", "1M")
    env = {"WEB_CONCURRENCY": str(WORKERS), "METRICS_TOKEN": METRICS_TOKEN,
           "MAX_IMAGE_SIZE": "1M"}
    left = left_by_a_killed_master()
    with server_with_account(tmp_path / "instance", "alice", env) as server:
        folder = metrics_folder(server.worker_pids()[0])
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # private, and new for this start
        assert not left.exists()
        expected = known_traffic(server, image)
        # Whichever worker answers, it tells every worker's figures.
        for _ in range(2 * WORKERS):
            assert live_counts(server) == expected

        killed = server.worker_pids()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(server.worker_pids()) == WORKERS
                   and not set(server.worker_pids()) & set(killed))
        assert live_counts(server) == expected  # only dead workers counted these

        data = image.read_bytes()
        assert http_call(server, "POST", "/images?name=f", server.headers, data)[0] == 201
        expected |= {uploads("stored"): 4, RECEIVED: expected[RECEIVED] + len(data),
                     requests("/images", "POST", 201): 4, ("imagestore_stored_images", ()): 3,
                     ("imagestore_stored_image_bytes", ()): 3 * len(data)}
        assert live_counts(server) == expected

        status, _, body = http_call(server, "GET", "/metrics")
        assert (status, json.loads(body)) == (
            401, {"message": "Metrics need the bearer token METRICS_TOKEN"})
        # The audit log went to standard error, one line per event, from every worker.
        assert audit_actions(server) == [
            "upload", "upload", "upload", "refuse", "refuse", "refuse", "download",
            "download", "download", "link.create", "link.use", "delete", "upload",
            "auth.failure"]
    assert not folder.exists()  # the master removed it on its way out
