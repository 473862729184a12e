#!/usr/bin/env python3
"""Reliability run against real gunicorn on loopback, each scenario on a fresh instance:

  load        N clients mix uploads, lists, downloads and deletes on 2 workers
  kill        kill -9 of a worker amid uploads and downloads, then a restart
  diskfull    uploads into a store on a small tmpfs (or loop-mounted ext4) until 507
  slow        50 clients send bodies at a few bytes a second while others are served
  qemubusy    qemu-img convert through a signed link, again and again, on a busy host
  dbdiskfull  database and store on one small tmpfs, filled by uploads until 507
  sweep       uploads from several clients while `flask sweep --min-age 0` runs in a loop
  silent      600 connections that send nothing and 50 that send headers slowly, held open
  counts      users under quotas mix every kind of upload and read on 2 workers, one killed;
              /metrics, the audit log and the quotas must agree with what clients were told

Prints a table of figures (requests, errors, lost, orphans) and exits 1 on any error,
loss or orphan. `--short` is the form CI runs. Needs qemu-img and qemu-io (qemu-block-extra
for qemubusy's HTTP reads); the disk-full scenarios need root to mount a small filesystem,
and are skipped (said so) without it.
"""

import argparse
import contextlib
import errno
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg2
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' image makers, for hostile uploads
import sample_images  # noqa: E402 - found through the lines above
from db_fixtures import PostgresSchemas  # noqa: E402

from harness import LiveServer  # noqa: E402

# What a client sees when the server's process dies under its request.
CUT_OFF = (OSError, http.client.HTTPException)
DISK = "application/octet-stream"
# How long raw connections are given to reach a worker before the fast client starts.
SETTLE = 1.5


# --- the service -----------------------------------------------------------------------

@dataclass
class Service(LiveServer):
    """harness's gunicorn as these scenarios want it: the access log dropped (the log is for
    errors), a minute to start, and started once /healthz answers at all (503 on a full disk);
    40 s to stop, beyond gunicorn's graceful_timeout of 30 s."""

    access_log: bool = False
    start_timeout: float = 60
    ready: tuple = (200, 503)
    stop_timeout: float = 40

    @property
    def database(self):
        return self.instance / "imagestore.sqlite3"

    @property
    def store(self):
        url = self.env.get("STORAGE_URL")
        return Path(url[len("file://"):]) if url else self.instance / "images"


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(service, method, path, token=None, body=None, headers=None, timeout=60):
    """One request on a new connection; a body that the server cut short still gets read."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        # docs/platform.md: an early answer closes the socket; the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


# --- images and the audit ---------------------------------------------------------------

def make_image(path, data_bytes, pattern, virtual="64M"):
    """A qcow2 with data_bytes of the byte pattern written into it, so each variant differs."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual], check=True)
    if data_bytes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -q -P {pattern} 0 {data_bytes}", str(path)], check=True,
                       capture_output=True)
    return Path(path).read_bytes()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@dataclass
class Audit:
    rows: int
    files: int
    rows_without_file: int
    files_without_row: int
    temp_files: int
    bad_files: int  # stored files whose sha256 differs from their row

    @property
    def orphans(self):
        return self.rows_without_file + self.files_without_row + self.temp_files


def incoming(store):
    """The store's temporary files (uploads under way, intents)."""
    folder = store / ".incoming"
    return list(folder.iterdir()) if folder.exists() else []


def libpq_url(url):
    """A DATABASE_URL as libpq reads it: a "+" in its query (a space to Python's parsers, and
    so to the service's) written %20."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(parse_qsl(parts.query), quote_via=quote)))


class Reader:
    """Reads of a service's database from outside: its SQLite file, opened read-only, or the
    PostgreSQL of its DATABASE_URL. Each snapshot() is one transaction, which sees the state
    of one moment (SQLite's read transaction, PostgreSQL's REPEATABLE READ)."""

    def __init__(self, service):
        url = service.env.get("DATABASE_URL")
        if url:
            self.conn, self.mark = psycopg2.connect(libpq_url(url)), "%s"
            self.conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        else:
            self.conn, self.mark = sqlite3.connect(f"file:{service.database}?mode=ro", uri=True,
                                                   isolation_level=None), "?"

    @contextlib.contextmanager
    def snapshot(self):
        """query(sql, args) -> rows, for the block; sql marks its arguments with ?."""
        cursor = self.conn.cursor()
        if self.mark == "?":
            cursor.execute("BEGIN")
        try:
            yield lambda sql, args=(): (cursor.execute(sql.replace("?", self.mark), args),
                                        cursor.fetchall())[1]
        finally:
            if self.mark == "?":
                cursor.execute("COMMIT")
            else:
                self.conn.rollback()  # nothing written: the transaction just ends

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.conn.close()


def audit(service):
    """Compare the database's rows with the store's files and its temporary folder."""
    with Reader(service) as db, db.snapshot() as query:
        rows = dict(query("SELECT storage_key, sha256 FROM image"))
    store = service.store
    files = {p.name[:-len(".qcow2")] for p in store.glob("*.qcow2")}
    temp = incoming(store)
    bad = sum(1 for key in set(rows) & files
              if sha256((store / f"{key}.qcow2").read_bytes()) != rows[key])
    return Audit(len(rows), len(files), len(set(rows) - files), len(files - set(rows)),
                 len(temp), bad)


@dataclass
class Figures:
    name: str
    requests: int = 0
    errors: int = 0
    lost: int = 0
    orphans: int = 0
    notes: list = field(default_factory=list)
    skipped: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, n=1, errors=0):
        with self.lock:
            self.requests += n
            self.errors += errors

    def error(self, what):
        with self.lock:
            self.errors += 1
            if len(self.notes) < 12:
                self.notes.append(what)

    @property
    def ok(self):
        return self.skipped or not (self.errors or self.lost or self.orphans)


def check_log(service, figures):
    """Errors the server logged that no client saw."""
    log = service.log_text()
    for needle in ("database is locked", "Traceback"):
        if needle in log:
            figures.error(f"server log has {needle!r} ({log.count(needle)} times)")
    if "Traceback" in log:
        last = log[log.rindex("Traceback"):].splitlines()
        figures.notes.append("last traceback: " + " | ".join(last[-4:])[:600])


@contextlib.contextmanager
def serving(instance, figures, extra_env=None, **options):
    """A started Service for the block; its log is checked when the block ends well."""
    service = Service.on(instance, extra_env, **options).start()
    try:
        yield service
        check_log(service, figures)
    finally:
        service.stop()


def list_all(service, token):
    """Every image of the user, page by page."""
    found, page = {}, 1
    while True:
        answer = request(service, "GET", f"/images?page={page}", token)
        if answer.status != 200:
            raise RuntimeError(f"list failed: {answer.status}")
        batch = answer.json()
        found.update((image["id"], image) for image in batch)
        if 'rel="next"' not in answer.headers.get("Link", ""):
            return found
        page += 1


def verify_outcome(service, token, created, deleted, figures, unanswered=0):
    """Every 201 image downloads with its sha256; every 204 image is gone from list and store.

    created maps id -> (name, sha256), deleted maps id -> name: SQLite hands out the id of a
    deleted last row again, so a deleted image is recognised by its name. unanswered uploads
    (the worker died before it answered) may have been stored whole: up to that many more.
    """
    try:
        listed = list_all(service, token)
    except (RuntimeError, *CUT_OFF) as error:
        figures.error(f"listing the images afterwards: {error!r}")
        listed = {}
    listed_names = {image["name"] for image in listed.values()}
    for image_id, (name, digest) in created.items():
        if image_id in deleted:
            continue
        answer = request(service, "GET", f"/images/{image_id}", token, headers={"Accept": DISK})
        figures.count()
        if (answer.status != 200 or sha256(answer.body) != digest
                or listed.get(image_id, {}).get("name") != name):
            figures.lost += 1
            figures.notes.append(f"image {image_id} ({name}) lost: {answer.status}")
    for image_id, name in deleted.items():
        answer = request(service, "GET", f"/images/{image_id}", token)
        figures.count()
        if name in listed_names or (answer.status == 200 and answer.json()["name"] == name):
            figures.error(f"deleted image {image_id} ({name}) still there")
    found = audit(service)
    figures.orphans += found.orphans
    figures.lost += found.bad_files
    expected = len(set(created) - set(deleted))
    if found.rows != found.files or not expected <= found.rows <= expected + unanswered:
        figures.error(f"store holds {found.rows} rows, {found.files} files; expected {expected}"
                      + (f" to {expected + unanswered}" if unanswered else ""))
    return found


# --- scenario: load ---------------------------------------------------------------------

class LoadClients:
    """Clients of one user mixing uploads, list pages, downloads and deletes, with a record
    of what the service answered: created maps id -> (name, sha256), deleted id -> name."""

    EXPECTED = (200, 201, 204)

    def __init__(self, service, token, images, figures):
        self.service, self.token, self.images, self.figures = service, token, images, figures
        self.created, self.deleted, self.reused = {}, {}, 0
        self.lock = threading.Lock()

    def run(self, clients, seconds):
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=self.loop, args=(c, stop_at)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def loop(self, client, stop_at):
        rng, n = random.Random(client), 0
        while time.monotonic() < stop_at:
            n += 1
            try:
                answer = self.step(client, n, rng)
            except CUT_OFF as error:
                self.figures.error(f"client {client}: {error!r}")
                continue
            if answer is not None:
                self.judge(answer)

    def step(self, client, n, rng):
        """One request of the mix; None when there was nothing to do."""
        pick = rng.random()
        if pick < 0.35:
            return self.upload(client, n, rng)
        if pick < 0.6:
            return self.get(f"/images?page={rng.randint(1, 3)}")
        if pick < 0.85:
            return self.download(rng)
        return self.delete(rng)

    def judge(self, answer):
        self.figures.count()
        if answer.status not in self.EXPECTED:
            self.figures.error(f"{answer.status} {answer.body[:120]!r}")
        elif b"database is locked" in answer.body:
            self.figures.error("database is locked")

    def get(self, path, **headers):
        return request(self.service, "GET", path, self.token, headers=headers)

    def live(self):
        with self.lock:
            return [i for i in self.created if i not in self.deleted]

    def upload(self, client, n, rng):
        data, name = rng.choice(self.images), f"c{client}-{n}"
        namespace = f"&namespace=team{client % 3}/sub" if n % 3 == 0 else ""
        answer = request(self.service, "POST", f"/images?name={name}{namespace}", self.token,
                         body=data)
        if answer.status == 201:
            image_id = answer.json()["id"]
            with self.lock:
                self.created[image_id] = (name, sha256(data))
                if self.deleted.pop(image_id, None):  # SQLite reused a deleted image's id
                    self.reused += 1
        return answer

    def download(self, rng):
        live = self.live()
        if not live:
            return None
        image_id = rng.choice(live)
        expected = self.created[image_id][1]
        answer = self.get(f"/images/{image_id}", Accept=DISK)
        with self.lock:
            gone = image_id in self.deleted or self.created[image_id][1] != expected
        if gone:  # deleted meanwhile by another client: 404 or the new image are right
            return None
        if answer.status == 200 and sha256(answer.body) != expected:
            self.figures.error(f"download of {image_id} has the wrong sha256")
        return answer

    def delete(self, rng):
        with self.lock:
            live = [i for i in self.created if i not in self.deleted]
            if not live:
                return None
            image_id = rng.choice(live)
            self.deleted[image_id] = self.created[image_id][0]
        answer = request(self.service, "DELETE", f"/images/{image_id}", self.token)
        if answer.status != 204:
            with self.lock:
                self.deleted.pop(image_id, None)
        return answer


def scenario_load(figures, base, clients, seconds, images):
    """Clients mixing every kind of request for seconds, then the outcome checked."""
    with serving(base / "load", figures) as service:
        load = LoadClients(service, service.token("loader"), images, figures)
        load.run(clients, seconds)
        found = verify_outcome(service, load.token, load.created, load.deleted, figures)
        figures.notes.insert(0, f"{clients} clients, {seconds} s, {len(load.created)} created, "
                                f"{len(load.deleted)} deleted, {found.rows} kept; "
                                f"{load.reused} ids of deleted images handed out again")


# --- scenario: kill -9 ------------------------------------------------------------------

def send_slowly(service, path, token, data, piece=256 << 10, pause=0.02):
    """POST data in pieces with pauses, so that the upload is still going when a kill lands."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        for start in range(0, len(data), piece):
            conn.send(data[start:start + piece])
            time.sleep(pause)
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


class KillRun:
    """Uploaders and downloaders that keep going while workers are killed under them."""

    def __init__(self, service, token, big_image, figures):
        self.service, self.token, self.big, self.figures = service, token, big_image, figures
        self.created, self.cut_off, self.unanswered_uploads = {}, 0, 0
        self.lock, self.stop = threading.Lock(), threading.Event()

    def seed(self, images):
        for n, data in enumerate(images):  # something to download from the start
            answer = request(self.service, "POST", f"/images?name=seed{n}", self.token,
                             body=data)
            self.created[answer.json()["id"]] = (f"seed{n}", sha256(data))

    def start(self, uploaders, downloaders):
        self.threads = [threading.Thread(target=self.uploader, args=(k,))
                        for k in range(uploaders)]
        self.threads += [threading.Thread(target=self.downloader, args=(k,))
                         for k in range(downloaders)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()

    def uploader(self, k):
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"k{k}-{n}"
            answer = self.attempt(send_slowly, self.service, f"/images?name={name}",
                                  self.token, self.big)
            if answer is None:
                with self.lock:
                    self.unanswered_uploads += 1
            if answer and answer.status == 201:
                with self.lock:
                    self.created[answer.json()["id"]] = (name, sha256(self.big))
            elif answer and answer.status >= 500:
                self.figures.error(f"upload {answer.status}")

    def downloader(self, k):
        rng = random.Random(k)
        while not self.stop.is_set():
            with self.lock:
                image_id, (_, digest) = rng.choice(list(self.created.items()))
            answer = self.attempt(request, self.service, "GET", f"/images/{image_id}",
                                  self.token, headers={"Accept": DISK})
            if answer and (answer.status >= 500 or (answer.status == 200
                                                    and sha256(answer.body) != digest)):
                self.figures.error(f"download {answer.status}")

    def attempt(self, call, *args, **kwargs):
        """The answer, or None when the worker died under the request (expected here)."""
        try:
            answer = call(*args, **kwargs)
        except CUT_OFF:
            with self.lock:
                self.cut_off += 1
            return None
        self.figures.count()
        return answer

    def kill_worker(self):
        """SIGKILL a worker; return how many temporary files it left (counted before its
        successor starts and sweeps them away)."""
        victim = self.service.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        incoming = self.service.store / ".incoming"
        return sum(1 for p in incoming.iterdir() if p.name.startswith(f"{victim}-"))


def scenario_kill(figures, base, seconds, big_image, images):
    """Two workers killed amid uploads and downloads, then a restart and the audit."""
    service = Service.on(base / "kill").start()
    try:
        run = KillRun(service, service.token("killer"), big_image, figures)
        run.seed(images[:3])
        run.start(uploaders=4, downloaders=2)
        left = 0
        for _ in range(2):  # twice, a while apart
            time.sleep(seconds / 3)
            left += run.kill_worker()
        time.sleep(seconds / 3)
        run.finish()
        service.stop()
        before = audit(service)
        service.start()  # the restart, whose workers sweep what the killed ones left
        found = verify_outcome(service, run.token, run.created, {}, figures,
                               run.unanswered_uploads)
        check_log_after_kill(service, figures)
        landed = found.rows - len(run.created)
        figures.notes.insert(0, f"2 workers killed, leaving {left} temporary files; "
                                f"{run.cut_off} requests cut off ({run.unanswered_uploads} "
                                f"uploads, {landed} of them stored whole all the same); "
                                f"before restart: {before.temp_files} temporary files, "
                                f"{before.files_without_row} files without row, "
                                f"{before.rows_without_file} rows without file; "
                                f"{found.rows} images kept")
    finally:
        service.stop()


def check_log_after_kill(service, figures):
    """As check_log, but the killed workers' own death is expected."""
    log = service.log_text()
    if "database is locked" in log:
        figures.error("server log has 'database is locked'")
    if log.count("Traceback") > 0:
        figures.error(f"server log has {log.count('Traceback')} tracebacks")


# --- scenario: disk full ----------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(folder, megabytes, kind="tmpfs"):
    """Mount a tmpfs of the given size, else (or when kind is ext4) a loop-mounted ext4
    image; yield the reason it cannot be done instead of a path when neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield None, "not root: cannot mount a small filesystem"
        return
    tried = subprocess.CompletedProcess([], 1)
    if kind == "tmpfs":
        tried = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                                str(folder)], check=False, capture_output=True, text=True)
    how = f"tmpfs of {megabytes} MiB"
    image = None
    if tried.returncode != 0:
        image = folder.parent / "small-fs.img"
        with open(image, "wb") as f:
            f.truncate(megabytes << 20)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=False,
                              capture_output=True)
        tried = subprocess.run(["mount", "-o", "loop", str(image), str(folder)],
                               check=False, capture_output=True, text=True)
        how = f"loop-mounted ext4 of {megabytes} MiB"
        if made.returncode or tried.returncode:
            image.unlink(missing_ok=True)
            yield None, f"cannot mount tmpfs or a loop ext4: {tried.stderr.strip()}"
            return
    try:
        yield folder, how
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        if image:
            image.unlink(missing_ok=True)


class DiskFiller:
    """Uploads until the disk is full, then the requests that must still work; created maps
    id -> (name, sha256) and deleted id -> name, as verify_outcome takes them."""

    def __init__(self, service, token, figures):
        self.service, self.token, self.figures = service, token, figures
        self.created, self.deleted = {}, {}

    def call(self, method, path, body=None, **headers):
        """One counted request; one cut off or timed out is an error, and None."""
        try:
            answer = request(self.service, method, path, self.token, body=body,
                             headers=headers)
        except CUT_OFF as error:
            self.figures.error(f"{method} {path}: {error!r}")
            return None
        self.figures.count()
        return answer

    def live(self):
        """The ids of the images stored and not deleted, oldest first."""
        return [i for i in self.created if i not in self.deleted]

    def upload(self, name, data):
        """An upload, recorded when it is answered 201."""
        answer = self.call("POST", f"/images?name={name}", data)
        if answer is not None and answer.status == 201:
            self.created[answer.json()["id"]] = (name, sha256(data))
        return answer

    def fill(self, data, prefix, fulls=3):
        """Upload data until `fulls` answers are 507 (JSON messages); return how many were."""
        full = 0
        for n in range(200):  # the small filesystems fill well before
            answer = self.upload(f"{prefix}{n}", data)
            if answer is None or answer.status == 201:
                continue
            if answer.status != 507:
                self.figures.error(f"upload {answer.status} {answer.body[:80]!r}")
                continue
            full += 1
            if not is_message(answer):
                self.figures.error(f"507 body is not a message: {answer.body[:80]!r}")
            if full >= fulls:
                break
        if not full:
            self.figures.error(f"the disk never filled up with {prefix} uploads")
        return full

    def health(self, expected):
        """/healthz, which must answer one of the expected statuses; what it said."""
        answer = self.call("GET", "/healthz")
        if answer is None:
            return "no answer"
        if answer.status not in expected:
            self.figures.error(f"healthz {answer.status} {answer.body[:80]!r}")
        return f"{answer.status} {answer.body.decode(errors='replace').strip()}"

    def read(self, count=5):
        """Downloads and a list, which must work while the disk is full."""
        for image_id in self.live()[:count]:
            answer = self.call("GET", f"/images/{image_id}", Accept=DISK)
            if answer and (answer.status != 200
                           or sha256(answer.body) != self.created[image_id][1]):
                self.figures.error(f"read while full: {answer.status} {answer.body[:80]!r}")
        listed = self.call("GET", "/images")
        if listed and listed.status != 200:
            self.figures.error(f"list while full: {listed.status} {listed.body[:80]!r}")

    def delete(self, count):
        """Delete the oldest images, which must answer 204 while the disk is full."""
        for image_id in self.live()[:count]:
            answer = self.call("DELETE", f"/images/{image_id}")
            if answer and answer.status == 204:
                self.deleted[image_id] = self.created[image_id][0]
            elif answer:
                self.figures.error(f"delete while full: {answer.status} {answer.body[:80]!r}")

    def recover(self, deletes, small_image):
        """Reads, health and deletes on the full disk, then health and an upload in the freed
        room; what healthz said, full and after the deletes."""
        when_full = self.health(expected=(200, 503))
        self.read()
        self.delete(deletes)
        after = self.health(expected=(200,))
        answer = self.upload("after", small_image)
        if answer and answer.status != 201:
            self.figures.error(f"upload after the deletes: {answer.status} {answer.body[:80]!r}")
        return when_full, after

    def verify(self):
        """The outcome of it all, checked from outside and inside."""
        verify_outcome(self.service, self.token, self.created, self.deleted, self.figures)


def is_message(answer):
    """Whether the answer's body is a JSON {"message": ...} and nothing else."""
    try:
        return set(answer.json()) == {"message"}
    except ValueError:
        return False


def on_small_disk(figures, folder, kind, serve, fill):
    """A disk-full scenario: a small filesystem mounted at folder (else the scenario skipped,
    saying why), the service that serve(mount) starts on it, filled by fill(filler, mount,
    how), which returns the scenario's note, and then the outcome checked."""
    with small_filesystem(folder, 64, kind) as (mount, how):
        if mount is None:
            figures.skipped = how
            return
        with serve(mount) as service:
            filler = DiskFiller(service, service.token("filler"), figures)
            figures.notes.insert(0, fill(filler, mount, how))
            filler.verify()


def scenario_diskfull(figures, base, big_image, small_image, kind="tmpfs"):
    """The store (not the database) on a small filesystem, filled by uploads."""

    def serve(mount):
        # A reserve below the disk's size, so that uploads are stored before they stop.
        return serving(base / "diskfull", figures,
                       {"STORAGE_URL": f"file://{mount}/images", "MIN_FREE_SPACE": "8M"})

    def fill(filler, mount, how):
        full = filler.fill(big_image, "fill")
        stored, temp = len(filler.created), len(incoming(filler.service.store))
        health, _ = filler.recover(1, small_image)
        return (f"{how}; {stored} images of {len(big_image) >> 20} MiB stored, then {full} x "
                f"507; temporary files when full: {temp}; healthz when full: {health}")

    on_small_disk(figures, base / "diskfull-store", kind, serve, fill)


# --- scenario: database and store on a full disk ----------------------------------------

def take_the_rest(path):
    """Write path until the disk is full, down to the last page; return how many bytes."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for piece in (1 << 20, 64 << 10, 4 << 10, 512):
            with contextlib.suppress(OSError):  # ENOSPC: on to smaller pieces
                while True:
                    written += f.write(b"\0" * piece)
    return written


def scenario_dbdiskfull(figures, base, big_image, small_image, kind="tmpfs"):
    """The whole instance folder, SQLite database and store, on the small filesystem."""

    def serve(mount):
        return serving(mount / "instance", figures, {"MIN_FREE_SPACE": "8M"},
                       log_path=base / "dbdiskfull-gunicorn.log")

    def fill(filler, mount, how):
        # Big images first, then small ones into what is left; then the last bytes go to a
        # file of someone else's, as a log or another program takes them on a real disk:
        # uploads alone leave what a commit needed.
        full = filler.fill(big_image, "big") + filler.fill(small_image, "small")
        stored, left = len(filler.created), take_the_rest(mount / "someone-else")
        when_full, after = filler.recover(3, small_image)
        return (f"{how} holding database and store; {stored} images stored, then {full} x "
                f"507; the last {left >> 10} KiB taken by another file; healthz when full: "
                f"{when_full}; after 3 deletes: {after}")

    on_small_disk(figures, base / "dbdiskfull-fs", kind, serve, fill)


# --- scenario: slow clients -------------------------------------------------------------

def open_connections(service, payloads, timeout):
    """A raw connection for each payload, which is sent at once (b"" sends nothing)."""
    sockets = []
    for payload in payloads:
        s = socket.create_connection(("127.0.0.1", service.port), timeout=timeout)
        s.sendall(payload)
        sockets.append(s)
    return sockets


def open_slow_uploads(service, token, count, timeout):
    """count connections that have sent upload headers for a 64 KiB body, and no body."""
    return open_connections(service, [
        (f"POST /images?name=slow{n} HTTP/1.1\r\nHost: x\r\n"
         f"Authorization: Bearer {token}\r\nContent-Length: {64 << 10}\r\n\r\n").encode()
        for n in range(count)], timeout)


@contextlib.contextmanager
def every_second(action):
    """Call action once a second, in a thread of its own, while the block runs."""
    stop = threading.Event()

    def loop():
        while not stop.wait(1.0):
            action()

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trickling(sockets):
    """Send 4 bytes (of a qcow2 body) each second on every socket while the block runs."""
    def trickle():
        for s in sockets:
            with contextlib.suppress(OSError):
                s.send(b"QFI\xfb")

    return every_second(trickle)


def fast_round(n, image, created):
    """One round of the fast client: a list, health, an upload, a download of the newest;
    each as method, path, body, headers and the sha256 the answer must have (or None)."""
    yield "GET", "/images", None, {}, None
    yield "GET", "/healthz", None, {}, None
    yield "POST", f"/images?name=fast{n}", image, {}, None
    if created:  # looked at when the round gets here, after the upload
        newest = next(reversed(created))
        yield "GET", f"/images/{newest}", None, {"Accept": DISK}, created[newest][1]


def fast_requests(service, token, seconds, image, timeout, figures):
    """Rounds of fast requests for seconds (the one under way when time is up is not started
    again); return how many answers, the images stored and the slowest answer's seconds."""
    fast, created, n, slowest = 0, {}, 0, 0.0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        n += 1
        for method, path, body, headers, digest in fast_round(n, image, created):
            if time.monotonic() >= stop_at:
                break
            started = time.monotonic()
            try:
                answer = request(service, method, path, token, body=body, headers=headers,
                                 timeout=timeout)
            except CUT_OFF as error:
                figures.error(f"fast {method} {path}: {error!r}")
                continue
            slowest = max(slowest, time.monotonic() - started)
            figures.count()
            fast += 1
            if answer.status not in (200, 201):
                figures.error(f"fast {method} {path}: {answer.status}")
            elif method == "POST":
                created[answer.json()["id"]] = (f"fast{n}", sha256(image))
            elif digest and sha256(answer.body) != digest:
                figures.error(f"fast {method} {path}: the wrong sha256")
    return fast, created, slowest


def scenario_slow(figures, base, slow_clients, seconds, small_image, body_timeout):
    """Bodies sent a few bytes a second while a fast client is served, then dropped."""
    with serving(base / "slow", figures, {"BODY_READ_TIMEOUT": str(body_timeout)}) as service:
        token = service.token("patient")
        sockets = open_slow_uploads(service, token, slow_clients, body_timeout * 4)
        with trickling(sockets):
            time.sleep(SETTLE)  # let every slow body be in a worker thread's hands
            fast, created, slowest = fast_requests(service, token, seconds, small_image,
                                                   body_timeout * 4, figures)
            # The fast requests were served while the slow bodies were still open: each
            # slow connection is still waiting for its answer now.
            still_open = sum(1 for s in sockets if not _answered(s))
            if still_open < slow_clients:
                figures.error(f"only {still_open} of {slow_clients} slow clients still open "
                              f"after the fast requests: the window was too long")
            # Then the stalled bodies are dropped: each gets a 408, nothing is kept.
            answers = [_wait_answer(s, body_timeout * 3) for s in sockets]
        for s in sockets:
            s.close()
        dropped = sum(1 for a in answers if a == 408)
        figures.count(len(sockets))
        if dropped != slow_clients:
            figures.error(f"slow clients answered {sorted(set(answers), key=str)}, "
                          f"{dropped} with 408")
        verify_outcome(service, token, created, {}, figures)
        figures.notes.insert(0, f"{slow_clients} slow bodies at 4 bytes/s held open; "
                                f"{fast} fast requests served meanwhile (the slowest in "
                                f"{slowest:.1f} s); {dropped} slow "
                                f"bodies dropped with 408 after the body timeout")


def _answered(sock):
    """Whether the server has answered (or closed) this connection yet."""
    try:
        sock.setblocking(False)
        return bool(sock.recv(1, socket.MSG_PEEK)) or True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _wait_answer(sock, timeout):
    """The status of the answer on a raw connection, or None."""
    sock.settimeout(timeout)
    try:
        head = sock.recv(64)
        return int(head.split()[1]) if head.startswith(b"HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


# --- scenario: silent and slow-header connections --------------------------------------

# A request line and the start of a header, which the trickle then never ends.
SLOW_HEADER = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


class HeldConnections:
    """Raw connections held open, each of a kind: first bytes, then a piece each second (or
    nothing); one that the server closes is opened again, so that as many stay open."""

    def __init__(self, service, timeout):
        self.service, self.timeout = service, timeout
        self.held = []  # [socket, kind]
        self.kinds, self.reopened = {}, {}

    def add(self, kind, count, first, piece):
        """count connections of a kind that send first at once, then piece each second."""
        self.kinds[kind], self.reopened[kind] = (first, piece), 0
        sockets = open_connections(self.service, [first] * count, self.timeout)
        self.held += [[s, kind] for s in sockets]

    def tend(self):
        """Once a second: each connection's piece, and a new one for each one closed."""
        for entry in self.held:
            sock, kind = entry
            first, piece = self.kinds[kind]
            if _answered(sock):
                sock.close()
                with contextlib.suppress(OSError):  # the listen backlog full: next time
                    entry[0] = open_connections(self.service, [first], self.timeout)[0]
                    self.reopened[kind] += 1
            elif piece:
                with contextlib.suppress(OSError):
                    sock.send(piece)

    def close(self):
        """Close every connection held."""
        for sock, _ in self.held:
            sock.close()


def scenario_silent(figures, base, silent, slow_headers, seconds, small_image, timeout=30):
    """Connections that send nothing, and ones that send headers a few bytes a second, held
    open while a fast client lists, checks health, uploads and downloads."""
    with serving(base / "silent", figures) as service:
        token = service.token("hurried")
        crowd = HeldConnections(service, timeout)
        crowd.add("silent", silent, b"", b"")
        crowd.add("slow-header", slow_headers, SLOW_HEADER, b"ab")
        try:
            with every_second(crowd.tend):
                time.sleep(SETTLE)  # let the workers take what connections they take
                fast, created, slowest = fast_requests(service, token, seconds,
                                                       small_image, timeout, figures)
        finally:
            crowd.close()
        verify_outcome(service, token, created, {}, figures)
        figures.notes.insert(0, f"{silent} silent and {slow_headers} slow-header connections "
                                f"held for {seconds} s (closed by the server and opened "
                                f"again: {crowd.reopened['silent']} and "
                                f"{crowd.reopened['slow-header']}); {fast} fast requests "
                                f"answered meanwhile, the slowest in {slowest:.1f} s (guard "
                                f"{timeout} s)")


# --- scenario: sweep while uploading ----------------------------------------------------

class UploadClients(LoadClients):
    """LoadClients that do nothing but upload."""

    def step(self, client, n, rng):
        return self.upload(client, n, rng)


class InBackground:
    """A context manager running self.threads while its block runs; self.stop (an Event)
    tells them to end, and the block's end waits for them."""

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


class Sweeper(InBackground):
    """`flask --app app sweep --min-age 0` on the service's instance, again and again, in
    each of a few threads while the block runs (more sweeps land in an upload's window)."""

    def __init__(self, service, figures, threads=2):
        self.service, self.figures = service, figures
        self.runs, self.removed = 0, 0
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.loop) for _ in range(threads)]

    def loop(self):
        """Sweep after sweep until stopped, counting the files each removed."""
        while not self.stop.is_set():
            try:
                said = self.service.flask("sweep", "--min-age", "0")
            except subprocess.CalledProcessError as error:
                self.figures.error(f"sweep failed: {error.stderr.strip()[-300:]}")
                continue
            with self.lock:
                self.runs += 1
                # "removed T temporary files and O orphan files"
                self.removed += int(said.split()[-3])


def scenario_sweep(figures, base, clients, seconds, images):
    """Uploads from several clients while the sweep runs in a loop: nothing answered 201 may
    go, whatever the sweep takes for an orphan."""
    with serving(base / "sweep", figures) as service:
        uploads = UploadClients(service, service.token("uploader"), images, figures)
        with Sweeper(service, figures) as sweeper:
            uploads.run(clients, seconds)
        found = verify_outcome(service, uploads.token, uploads.created, {}, figures)
        figures.notes.insert(0, f"{clients} uploaders for {seconds} s, {len(uploads.created)} "
                                f"answered 201; {sweeper.runs} sweeps meanwhile removed "
                                f"{sweeper.removed} files as orphans; {found.rows} rows, "
                                f"{found.files} files afterwards")


# --- scenario: QEMU reads through a link on a busy host ---------------------------------

@contextlib.contextmanager
def busy_host(seconds, loops=2):
    """CPU-bound shell loops for the block, each under timeout in case this process dies."""
    hogs = [subprocess.Popen(["timeout", str(seconds), "sh", "-c", "while :; do :; done"])
            for _ in range(loops)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.terminate()  # timeout hands the signal on to its loop
        for hog in hogs:
            hog.wait()


def qemu_convert_args(link):
    """The qemu-img arguments that copy a link's image, as the answer tells a user to: its
    own qemu_img_args (-m 1: QEMU 7.2 loses a request now and then with more in flight,
    docs/downloads.md), else the same built from its url, giving each HTTP request 60 s
    instead of the curl driver's 5."""
    if link.get("qemu_img_args"):
        return link["qemu_img_args"], "qemu_img_args of the answer"
    spec = {"file": {"driver": "http", "url": link["url"], "timeout": 60}}
    return ["convert", "-m", "1", "-f", "qcow2", "json:" + json.dumps(spec)], \
        "json: built from url, with -m 1"


class QemuReads:
    """qemu-img convert of one image through its link, each under a hard timeout and
    compared with the original."""

    def __init__(self, original, args, figures, timeout):
        self.original, self.args, self.figures = original, args, figures
        self.timeout, self.seconds = timeout, []

    def convert(self, n):
        """One convert through the link into a copy, judged and then removed."""
        copy = self.original.with_name(f"copy{n}.qcow2")
        started = time.monotonic()
        done = subprocess.run(["timeout", "-k", "5", str(self.timeout), "qemu-img",
                               *self.args, "-O", "qcow2", str(copy)],
                              capture_output=True, text=True, check=False)
        self.seconds.append(time.monotonic() - started)
        self.figures.count()
        if done.returncode in (124, 137):  # timeout's own exit statuses
            self.figures.error(f"convert {n} still running after {self.timeout} s: killed")
        elif done.returncode:
            self.figures.error(f"convert {n} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-200:]}")
        elif subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                             str(self.original), str(copy)], check=False).returncode:
            self.figures.error(f"convert {n}: the copy differs from the original")
        copy.unlink(missing_ok=True)


def scenario_qemubusy(figures, base, runs, timeout=90):
    """qemu-img convert of an 8 MiB image through a signed link, runs times, while two
    CPU-bound loops keep both cores busy."""
    original = base / "qemu" / "original.qcow2"
    original.parent.mkdir()
    data = make_image(original, 8 << 20, 0x3C, virtual="8M")
    with serving(base / "qemubusy", figures) as service:
        token = service.token("reader")
        stored = request(service, "POST", "/images?name=qemu8m", token, body=data)
        link = request(service, "POST", f"/images/{stored.json()['id']}/links", token)
        figures.count(2)
        args, how = qemu_convert_args(link.json())
        reads = QemuReads(original, args, figures, timeout)
        with busy_host(runs * (timeout + 10) + 60):
            for n in range(runs):
                reads.convert(n)
        figures.notes.insert(0, f"{runs} converts of 8 MiB through the link ({how}) beside "
                                f"2 busy loops; each took {min(reads.seconds):.1f} to "
                                f"{max(reads.seconds):.1f} s (hard timeout {timeout} s)")


# --- scenario: counts: metrics, quotas and the audit log under a mixed load ------------

METRICS_TOKEN = "reliability-metrics-token"
NAME_TAKEN = "Name already exists"
# How the service words a quota's refusal (quotas.exceeded): label, limit, unit, use, and the
# image's bytes when its length was known.
QUOTA_REFUSAL = re.compile(r"Quota exceeded: (.+) may keep (\d+) (byte|image)s?; (\d+) in use"
                           r"(?:, and this image is (\d+) bytes)?$")
QUOTA_OUTCOMES = {"quota_bytes", "quota_images"}
# Routes as /metrics labels them (Flask's URL rules).
IMAGES, IMAGE, LINKS = "/images", "/images/<int:image_id>", "/images/<int:image_id>/links"
LINK, TEAM_LIST = "/links/<token>/<filename>", "/n/<username>/<path:path>/-/images"
NOT_SCRAPED = ("/metrics", "/healthz")  # the runner's own requests, not the clients'

S = sample_images
# Hostile uploads, each with the rule that must refuse it (docs/observability.md), made by
# the tests' own makers.
HOSTILE_UPLOADS = (
    ("raw", S.raw, "not_qcow2"),
    ("gzip", S.gzipped, "not_qcow2"),
    ("random", S.random_bytes, "not_qcow2"),
    ("truncated-header", S.truncated_header, "truncated"),
    ("version-4", lambda d: S.patched(d, S.VERSION, 4, 4), "unsupported_version"),
    ("size-not-sectors", lambda d: S.patched(d, S.SIZE, (1 << 20) + 1), "malformed_header"),
    ("l1-size-absurd", lambda d: S.patched(d, S.L1_SIZE, 2**31 - 1, 4), "malformed_tables"),
    ("backing-file", S.backing_path, "backing_file"),
    ("data-file", S.data_file, "data_file"),
    ("aes", S.aes_qcow2, "encrypted"),
    ("corrupt-bit", lambda d: S.set_incompatible(S.good_v3(d), 1 << 1), "corrupt"),
    ("truncated-body", S.truncated_body, "corrupt"),
    ("dirty-bit", lambda d: S.set_incompatible(S.good_v3(d), 1 << 0), "dirty"),
    ("unknown-feature", lambda d: S.set_incompatible(S.good_v3(d), 1 << 5), "unknown_features"),
    ("huge-virtual-size", lambda d: S.patched(d, S.SIZE, 2**64 - 1), "virtual_size"),
)


def make_hostile(folder):
    """(case, bytes, rule) of each hostile upload, made in a folder of its own."""
    made = []
    for case, maker, rule in HOSTILE_UPLOADS:
        (folder / case).mkdir(parents=True)
        made.append((case, maker(folder / case).read_bytes(), rule))
    return made


def counts_quotas(short):
    """The admin's quotas by the label the service names them with: (most bytes, most
    images), None for no limit. carol's bytes and the team's images run out early on; dave's
    bytes count his own images and the team's; frank's few images are full all the while he
    uploads and deletes."""
    if short:
        return {"user carol": (6_000_000, None), "user dave": (8_000_000, None),
                "namespace team@dave": (None, 8), "user frank": (None, 3)}
    return {"user carol": (25_000_000, None), "user dave": (30_000_000, None),
            "namespace team@dave": (None, 30), "user frank": (None, 4)}


@dataclass(frozen=True)
class Role:
    """The clients of one user: where they upload (namespace as the query names it, the pool
    the image joins, the quotas it counts against), the pools they read and the one they
    delete from, and their mix of steps (CountsRun.step_NAME) by weight."""

    user: str
    targets: tuple
    reads: tuple
    deletes: str | None
    mix: dict


DAVE_AND_TEAM = ("user dave", "namespace team@dave")
ROLES = (
    Role("bob", (("", "bob", ()),), ("bob",), "bob",
         {"good": 3, "chunked": 1, "hostile": 3, "cut": 1, "cut_chunked": 1, "taken": 1,
          "bad_name": 1, "too_large": 1, "bad_token": 1, "file": 2, "range": 1,
          "conditional": 1, "head": 1, "bad_range": 1, "link": 1, "delete": 2, "list": 1}),
    Role("carol", (("", "carol", ("user carol",)), ("proj", "carol", ("user carol",))),
         ("carol",), None, {"good": 4, "chunked": 1, "cut": 1, "file": 1, "range": 1, "list": 1}),
    Role("dave", (("", "dave", ("user dave",)), ("team", "team", DAVE_AND_TEAM)),
         ("dave", "team"), None,
         {"good": 3, "chunked": 1, "file": 1, "conditional": 1, "team_list": 1}),
    Role("erin", (("team@dave", "team", DAVE_AND_TEAM), ("team/sub@dave", "team", DAVE_AND_TEAM)),
         ("team",), "team",
         {"good": 3, "chunked": 1, "delete": 1, "file": 1, "link": 1, "team_list": 1}),
    Role("frank", (("", "frank", ("user frank",)),), ("frank",), "frank",
         {"good": 3, "chunked": 1, "delete": 2, "file": 1, "range": 1, "conditional": 1}),
)


@dataclass
class Sent:
    """One request of the counts scenario as its client saw it: what /metrics, the audit log
    and the quotas must then show for it."""

    route: str
    method: str
    started: float = field(default_factory=time.monotonic)
    answered: float = 0.0
    status: int = 0
    outcome: str = ""  # an upload's: "stored", or the rule of its refusal
    via: str = ""  # a download's: "file" or "link"
    sent: int = 0  # a download's bytes of the file (200, 206)
    size: int = 0  # an upload's bytes
    quotas: tuple = ()  # the quotas an upload counts against
    image_id: int | None = None
    digest: str = ""  # a stored upload's sha256
    message: str = ""  # an upload's answer


def upload_outcome(answer, file_rule=None):
    """The rule an upload's answer stands for, as /metrics and the audit log must name it:
    "stored", or the refusal's (file_rule: that of the file sent, for a 400 of the file)."""
    if answer.status == 201:
        return "stored"
    try:
        body = answer.json()
    except ValueError:
        return f"status_{answer.status}"
    message = body.get("message", "")
    if answer.status == 403 and (quota := QUOTA_REFUSAL.match(message)):
        return f"quota_{quota[3]}s"
    if answer.status == 400 and "file" in body:
        return file_rule or "file"
    if answer.status == 400 and "name" in body:
        return "name_taken" if body["name"] == [NAME_TAKEN] else "name"
    if answer.status == 400 and message.startswith("Upload cut off"):
        return "broken_body"
    return {411: "length_required", 413: "too_large"}.get(answer.status,
                                                           f"status_{answer.status}")


def cut_upload(service, path, token, data, chunked):
    """POST a body that stops halfway: the head promises all of data (its Content-Length, or
    one chunk of its size), half of it is sent, then the sending side is shut; the answer is
    read all the same."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    half = data[:len(data) // 2]
    if chunked:
        head, body = head + "Transfer-Encoding: chunked\r\n\r\n", f"{len(data):x}\r\n".encode()
    else:
        head, body = head + f"Content-Length: {len(data)}\r\n\r\n", b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as sock:
        # An early answer (a quota's 403) closes the connection while half is still on its
        # way: past the 64 KiB that gunicorn drains the server resets it, and the send, or
        # the shutdown of a socket the reset has closed (ENOTCONN), fails. The answer came
        # before the reset and is still read below.
        try:
            sock.sendall(head.encode() + body + half)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Answer(response.status, dict(response.getheaders()), response.read())


def in_pieces(data, piece=64 << 10):
    """data as an iterable, which http.client sends chunked (no Content-Length)."""
    return (data[start:start + piece] for start in range(0, len(data), piece))


class Gate:
    """Lets the clients' steps through, or holds them between two steps: with nothing in
    flight, a worker killed then takes no request with it, and every request stays counted
    exactly."""

    def __init__(self):
        self.cond, self.in_flight, self.closed = threading.Condition(), 0, False

    @contextlib.contextmanager
    def passing(self):
        """One client's step, once the gate is open."""
        with self.cond:
            self.cond.wait_for(lambda: not self.closed)
            self.in_flight += 1
        try:
            yield
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    @contextlib.contextmanager
    def held(self):
        """The block, run once no step is in flight; no step starts meanwhile."""
        with self.cond:
            self.closed = True
            self.cond.wait_for(lambda: not self.in_flight)
        try:
            yield
        finally:
            with self.cond:
                self.closed = False
                self.cond.notify_all()


class CountsRun:
    """The clients of the counts scenario, with a ledger of every request they sent and of
    what they were answered; pools hold the images stored and not deleted, by pool."""

    def __init__(self, service, tokens, images, hostile, figures):
        self.service, self.tokens, self.images, self.hostile = service, tokens, images, hostile
        self.figures, self.ledger, self.lock, self.gate = figures, [], threading.Lock(), Gate()
        self.pools = {role.user: {} for role in ROLES} | {"team": {}}
        self.claimed = set()  # ids a client is deleting or has deleted
        self.stop = threading.Event()

    def start(self, clients):
        """clients[i] clients of ROLES[i], each in a thread of its own."""
        self.threads = [threading.Thread(target=self.client, args=(role, k))
                        for role, count in zip(ROLES, clients, strict=True)
                        for k in range(count)]
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def client(self, role, k):
        """Steps of the role's mix until stopped; a request without an answer is an error."""
        rng, n = random.Random(f"{role.user}{k}"), 0
        steps, weights = zip(*role.mix.items(), strict=True)
        while not self.stop.is_set():
            n += 1
            step = rng.choices(steps, weights)[0]
            with self.gate.passing():
                try:
                    getattr(self, f"step_{step}")(role, f"{role.user}{k}-{n}", rng)
                except CUT_OFF as error:
                    self.figures.error(f"{role.user} {step}: no answer: {error!r}")
                except Exception as error:  # noqa: BLE001 - a client must not die unseen
                    self.figures.error(f"{role.user} {step}: {error!r}")

    def note(self, sent, answer):
        """Put the answer's status and time into sent, and sent into the ledger."""
        sent.answered, sent.status = time.monotonic(), answer.status
        with self.lock:
            self.ledger.append(sent)
        self.figures.count()
        return answer

    def call(self, sent, path, user, body=None, headers=None, token=None):
        """One request of sent's method on a new connection, noted in the ledger."""
        return self.note(sent, request(self.service, sent.method, path,
                                       token or self.tokens[user], body=body, headers=headers))

    # --- uploads

    def upload(self, role, name, rng, data, allowed=("stored",), send=None, file_rule=None):
        """POST data as name into one of the role's targets (send(path, token) sends it, by
        default with its Content-Length); the outcome must be one of allowed, or a quota's
        refusal where a quota applies."""
        namespace, pool, quotas = rng.choice(role.targets)
        path = f"/images?name={name}" + (f"&namespace={namespace}" if namespace else "")
        sent = Sent(IMAGES, "POST", size=len(data), quotas=quotas)
        token = self.tokens[role.user]
        answer = self.note(sent, send(path, token) if send else request(
            self.service, "POST", path, token, body=data))
        sent.outcome = upload_outcome(answer, file_rule)
        sent.message = answer.body[:1000].decode(errors="replace")
        if sent.outcome not in {*allowed, *(QUOTA_OUTCOMES if quotas else ())}:
            self.figures.error(f"{role.user} upload {name}: {sent.outcome} {sent.message}")
        elif sent.outcome == "stored":
            sent.image_id, sent.digest = answer.json()["id"], sha256(data)
            with self.lock:
                self.pools[pool][sent.image_id] = (sent.digest, len(data))

    def seed(self):
        """bob's image that nobody deletes, whose name step_taken sends again."""
        self.upload(ROLES[0], "bob-keep", random.Random(0), self.images[0])
        with self.lock:
            self.pools["bob"].clear()

    def step_good(self, role, name, rng):
        self.upload(role, name, rng, rng.choice(self.images))

    def step_chunked(self, role, name, rng):
        data = rng.choice(self.images)
        self.upload(role, name, rng, data, send=lambda path, token: request(
            self.service, "POST", path, token, body=in_pieces(data)))

    def step_hostile(self, role, name, rng):
        case, data, rule = rng.choice(self.hostile)
        self.upload(role, f"{name}-{case}", rng, data, allowed=(rule,), file_rule=rule)

    def step_cut(self, role, name, rng, chunked=False):
        data = rng.choice(self.images)
        self.upload(role, name, rng, data, allowed=("broken_body",),
                    send=lambda path, token: cut_upload(self.service, path, token, data, chunked))

    def step_cut_chunked(self, role, name, rng):
        self.step_cut(role, name, rng, chunked=True)

    def step_taken(self, role, name, rng):
        self.upload(role, "bob-keep", rng, self.images[0], allowed=("name_taken",))

    def step_bad_name(self, role, name, rng):
        self.upload(role, f"{name}%20x", rng, self.images[0], allowed=("name",))

    def step_too_large(self, role, name, rng):
        self.upload(role, name, rng, b"", allowed=("too_large",),
                    send=lambda path, token: request(self.service, "POST", path, token,
                                                     headers={"Content-Length": str(5 << 20)}))

    def step_bad_token(self, role, name, rng):
        """An upload with a token nobody has: 401, and no upload to count."""
        answer = self.call(Sent(IMAGES, "POST"), f"/images?name={name}", role.user,
                           self.images[0], token="not-a-token")
        if answer.status != 401:
            self.figures.error(f"upload with a wrong token: {answer.status}")

    # --- reads and deletes

    def pick(self, role, rng):
        """(id, sha256) of an image of a pool the role reads, or None."""
        with self.lock:
            live = list(self.pools[rng.choice(role.reads)].items())
        if not live:
            return None
        image_id, (digest, _) = rng.choice(live)
        return image_id, digest

    def judge(self, sent, answer, expected, digest=None):
        """A read must be answered expected, or 404 for an image being deleted."""
        if answer.status == 404 and sent.image_id in self.claimed:
            return False
        if answer.status != expected or (digest and sha256(answer.body) != digest):
            self.figures.error(f"{sent.method} {sent.route} of {sent.image_id}: "
                               f"{answer.status} (expected {expected}) {answer.body[:100]!r}")
            return False
        if expected in (200, 206) and sent.via:
            sent.sent = int(answer.headers["Content-Length"])
        return True

    def download(self, role, rng, expected, headers=lambda digest: {}, method="GET",
                 via="file"):
        """A GET of a file the role reads (a download via "file", as /metrics counts it),
        headers(its sha256) added to Accept."""
        if (picked := self.pick(role, rng)) is None:
            return
        image_id, digest = picked
        sent = Sent(IMAGE, method, via=via if method == "GET" else "", image_id=image_id)
        answer = self.call(sent, f"/images/{image_id}", role.user,
                           headers={"Accept": DISK, **headers(digest)})
        whole = expected == 200 and method == "GET"
        if (self.judge(sent, answer, expected, digest if whole else None)
                and expected == 206 and len(answer.body) != 4096):
            self.figures.error(f"range of {image_id}: {len(answer.body)} bytes")

    def step_file(self, role, name, rng):
        self.download(role, rng, 200)

    def step_range(self, role, name, rng):
        self.download(role, rng, 206, lambda digest: {"Range": "bytes=0-4095"})

    def step_conditional(self, role, name, rng):
        self.download(role, rng, 304, lambda digest: {"If-None-Match": f'"{digest}"'})

    def step_head(self, role, name, rng):
        """A HEAD of a file: its headers, no file read, so no download to count."""
        self.download(role, rng, 200, method="HEAD")

    def step_bad_range(self, role, name, rng):
        """A Range past the end: 416, no file read, so no download to count."""
        self.download(role, rng, 416, lambda digest: {"Range": "bytes=99999999-"}, via="")

    def step_link(self, role, name, rng):
        """A signed link made, then followed without a token."""
        if (picked := self.pick(role, rng)) is None:
            return
        image_id, digest = picked
        made = Sent(LINKS, "POST", image_id=image_id)
        answer = self.call(made, f"/images/{image_id}/links", role.user)
        if self.judge(made, answer, 201):
            used = Sent(LINK, "GET", via="link", image_id=image_id)
            path = answer.json()["url"].removeprefix(self.service.url)
            self.judge(used, self.note(used, request(self.service, "GET", path)), 200, digest)

    def step_delete(self, role, name, rng):
        with self.lock:
            live = [i for i in self.pools[role.deletes] if i not in self.claimed]
            if not live:
                return
            image_id = rng.choice(live)
            self.claimed.add(image_id)
        sent = Sent(IMAGE, "DELETE", image_id=image_id)
        answer = self.call(sent, f"/images/{image_id}", role.user)
        if answer.status != 204:
            self.figures.error(f"delete of {image_id}: {answer.status} {answer.body[:100]!r}")
            return
        with self.lock:
            del self.pools[role.deletes][image_id]

    def step_list(self, role, name, rng):
        sent = Sent(IMAGES, "GET")
        self.judge(sent, self.call(sent, f"/images?page={rng.randint(1, 3)}", role.user), 200)

    def step_team_list(self, role, name, rng):
        sent = Sent(TEAM_LIST, "GET")
        self.judge(sent, self.call(sent, "/n/dave/team/-/images", role.user), 200)


# --- the counts scenario: the admin's part, and what is read from inside -----------------

def quota_target(label):
    """The quota commands' TARGET for a label: "user carol" is carol, "namespace team@dave"
    team@dave."""
    return label.split(" ", 1)[1]


def limit_options(limit):
    """The options of `quota set` for (most bytes, most images)."""
    most_bytes, most_images = limit
    return [*(["--bytes", str(most_bytes)] if most_bytes is not None else []),
            *(["--images", str(most_images)] if most_images is not None else [])]


def counts_accounts(service, quotas):
    """The users and their tokens, dave's team (and team/sub; erin collaborates) and the
    quotas, by the admin commands, a few at once (each is a process of a second or so)."""
    users = [role.user for role in ROLES]
    with ThreadPoolExecutor(4) as pool:
        tokens = dict(zip(users, pool.map(service.token, users), strict=True))
        service.flask("namespace", "create", "team/sub", "--owner", "dave")
        commands = [("namespace", "add-collaborator", "team@dave", "erin")] + [
            ("quota", "set", quota_target(label), *limit_options(limit))
            for label, limit in quotas.items()]
        list(pool.map(lambda args: service.flask(*args), commands))
    return tokens


USE_OF_USER = ('SELECT COALESCE(SUM(size), 0), COUNT(*) FROM image WHERE user_id = '
               '(SELECT id FROM "user" WHERE username = ?)')
USE_OF_TREE = ('SELECT COALESCE(SUM(size), 0), COUNT(*) FROM image WHERE namespace_id IN '
               '(SELECT n.id FROM namespace n JOIN namespace r ON n.root_id = r.id '
               'JOIN "user" u ON r.user_id = u.id '
               'WHERE r.parent_id IS NULL AND r.path = ? AND u.username = ?)')


def quota_use(db, labels):
    """{label: (bytes, images)} as quotas.py counts them (a user's images wherever they are,
    a root's whole tree), all read in one snapshot of db (a Reader): one moment's state."""
    with db.snapshot() as query:
        return {label: tuple(int(n) for n in query(*use_query(label))[0]) for label in labels}


def use_query(label):
    """The SQL and its arguments that count a quota's use."""
    kind, target = label.split(" ", 1)
    if kind == "user":
        return USE_OF_USER, (target,)
    return USE_OF_TREE, tuple(target.split("@"))


def over_limit(use, limit):
    """What of use (bytes, images) is past limit (most bytes, most images), in words; ''."""
    return " and ".join(f"{used} {unit} of {most}" for used, most, unit
                        in zip(use, limit, ("bytes", "images"), strict=True)
                        if most is not None and used > most)


def shown_use(said):
    """(bytes, images) in use, from what `quota show` printed."""
    found = dict(re.findall(r"^(bytes|images): (\d+) used", said, re.MULTILINE))
    return int(found["bytes"]), int(found["images"])


class QuotaWatch(InBackground):
    """While the load runs, every quota's use read from the database again and again (one
    read transaction a sample): no sample may find a quota past its limit. fullest: the most
    each held, (bytes, images).

    Not `quota show` meanwhile: every admin command recounts the stored images' totals that
    /metrics shows (app.prepare_instance), which would hide any drift of them; it runs at the
    end, after the last scrape."""

    def __init__(self, service, quotas, figures):
        self.service, self.quotas, self.figures = service, quotas, figures
        self.samples, self.fullest = 0, {label: (0, 0) for label in quotas}
        self.over = Counter()  # (label, where): samples that found the quota past its limit
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.sample)]

    def sample(self):
        try:
            with Reader(self.service) as db:
                while not self.stop.wait(0.05):
                    self.judge(quota_use(db, self.quotas), "the database")
                    self.samples += 1
        except Exception as error:  # noqa: BLE001 - a sampler that stopped is a failure
            self.figures.error(f"sampling the database stopped: {error!r}")

    def judge(self, uses, where):
        """Note how full each quota is; an error the first time one is found past its limit
        (by where), and a count of the samples that found it so."""
        for label, use in uses.items():
            self.fullest[label] = tuple(map(max, self.fullest[label], use))
            if past := over_limit(use, self.quotas[label]):
                self.over[label, where] += 1
                if self.over[label, where] == 1:
                    self.figures.error(f"{where}: {label} holds {past}")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for (label, where), samples in self.over.items():
            self.figures.notes.append(f"{samples} samples of {where} found {label} past its "
                                      f"limit")


def scrape(service):
    """The samples of /metrics, {(name, sorted labels): value}, without those of the runner's
    own requests (NOT_SCRAPED)."""
    answer = request(service, "GET", "/metrics", METRICS_TOKEN)
    if answer.status != 200:
        raise RuntimeError(f"/metrics answered {answer.status}")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.body.decode())
            for sample in family.samples if sample.labels.get("route") not in NOT_SCRAPED}


def differences(expected, found, most=6):
    """The keys where two mappings differ (a missing one is 0), with both values, in words."""
    keys = sorted(key for key in {*expected, *found} if expected.get(key, 0) != found.get(key, 0))
    said = "; ".join(f"{key}: {expected.get(key, 0)} != {found.get(key, 0)}"
                     for key in keys[:most])
    return said + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def kill_between_steps(run, figures):
    """Hold the clients between two steps, kill -9 a worker and wait for the master's new
    one: the figures must be what they were (the dead worker's files still count)."""
    with run.gate.held():
        before = scrape(run.service)
        check_gauges(run.service, before, figures, "before the kill")
        victim = run.service.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in (pids := run.service.worker_pids()) or len(pids) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no new worker within 60 s of the kill")
            time.sleep(0.1)  # gunicorn tells nobody when a worker is up
        after = scrape(run.service)
        if after != before:
            figures.error(f"the figures changed with the kill: {differences(before, after)}")
    return victim


# --- the counts scenario: what the clients saw against what was counted ------------------

def metric(scraped, name, *labels):
    """{the label values: value} of a metric's samples (those that are not 0)."""
    return Counter({tuple(dict(key)[label] for label in labels): int(value)
                    for (sample, key), value in scraped.items() if sample == name and value})


def check_metrics(ledger, scraped, figures):
    """/metrics against the ledger: uploads by outcome, requests by route, method and status,
    downloads by way and status, the bytes of files sent."""
    downloads = [s for s in ledger if s.via and s.status in (200, 206, 304)]
    pairs = {
        "uploads by outcome": (Counter((s.outcome,) for s in ledger if s.outcome),
                               metric(scraped, "imagestore_uploads_total", "outcome")),
        "requests": (Counter((s.route, s.method, str(s.status)) for s in ledger),
                     metric(scraped, "imagestore_http_requests_total", "route", "method",
                            "status")),
        "downloads": (Counter((s.via, str(s.status)) for s in downloads),
                      metric(scraped, "imagestore_downloads_total", "via", "status")),
        "bytes sent": (Counter({(): sum(s.sent for s in downloads)}),
                       metric(scraped, "imagestore_sent_bytes_total")),
    }
    for what, (seen, counted) in pairs.items():
        if seen != counted:
            figures.error(f"{what}: seen by the clients != counted by /metrics: "
                          f"{differences(seen, counted)}")


def check_gauges(service, scraped, figures, when):
    """The stored images' gauges of a scrape against a recount of the database and of the
    store, made while nothing changes them; the database's rows, {id: (sha256, size)}, and
    the recount (images, bytes)."""
    with Reader(service) as db, db.snapshot() as query:
        rows = {i: (digest, size) for i, digest, size
                in query("SELECT id, sha256, size FROM image")}
    files = list(service.store.glob("*.qcow2"))
    gauges = (scraped.get(("imagestore_stored_images", ())),
              scraped.get(("imagestore_stored_image_bytes", ())))
    recount = (len(rows), sum(size for _, size in rows.values()))
    in_store = (len(files), sum(f.stat().st_size for f in files))
    if not gauges == recount == in_store:
        figures.error(f"stored (images, bytes) {when}: /metrics {gauges}, database "
                      f"{recount}, store {in_store}")
    return rows, recount


def check_stored(run, scraped, figures):
    """The stored images' gauges at the end (check_gauges), and the database's rows against
    what the clients were answered (201s less 204s)."""
    rows, recount = check_gauges(run.service, scraped, figures, "at the end")
    stored = {s.image_id: s for s in run.ledger if s.outcome == "stored"}
    deleted = {s.image_id for s in run.ledger if s.method == "DELETE" and s.status == 204}
    live = set(stored) - deleted
    for image_id in live:
        if rows.get(image_id) != (stored[image_id].digest, stored[image_id].size):
            figures.lost += 1
            figures.notes.append(f"image {image_id} lost: {rows.get(image_id)}")
    if set(rows) - live:
        figures.error(f"rows that no client was answered 201 for, or deleted: "
                      f"{sorted(set(rows) - live)[:10]}")
    found = audit(run.service)
    figures.orphans += found.orphans
    figures.lost += found.bad_files
    return recount


def check_audit_log(ledger, path, figures):
    """One audit line for each upload stored (its image, sha256 and bytes) or refused (its
    rule), delete, download and link used (status and bytes sent), link made and failed
    token, as the clients saw them; no other line. Returns the lines."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    downloads = [s for s in ledger if s.via and s.status in (200, 206, 304)]
    answered = {
        ("upload", "image_id", "sha256", "bytes"): [
            (s.image_id, s.digest, s.size) for s in ledger if s.outcome == "stored"],
        ("refuse", "rule"): [(s.outcome,) for s in ledger if s.outcome not in ("", "stored")],
        ("delete", "image_id"): [(s.image_id,) for s in ledger
                                 if s.method == "DELETE" and s.status == 204],
        ("download", "image_id", "status", "bytes"): [
            (s.image_id, s.status, s.sent) for s in downloads if s.via == "file"],
        ("link.use", "image_id", "status", "bytes"): [
            (s.image_id, s.status, s.sent) for s in downloads if s.via == "link"],
        ("link.create", "image_id"): [(s.image_id,) for s in ledger
                                      if s.route == LINKS and s.status == 201],
        ("auth.failure", "status"): [(s.status,) for s in ledger if s.status == 401],
    }
    for (action, *keys), seen in answered.items():
        written = Counter(tuple(line[key] for key in keys) for line in lines
                          if line["action"] == action)
        if written != Counter(seen):
            figures.error(f"audit log, {action} by {', '.join(keys)}: seen by the clients != "
                          f"written: {differences(Counter(seen), written)}")
    unknown = {line["action"] for line in lines} - {action for action, *_ in answered}
    if unknown:
        figures.error(f"audit log has lines of {sorted(unknown)}, which no client caused")
    return lines


def window_use(upload, stored, deleted):
    """What may have counted against one quota when upload was checked, from the stored
    uploads of that quota and the deletes: ((bytes, images) surely there: answered 201 before
    it started, not deleted before it was answered), ((bytes, images) maybe there: started
    before it was answered, not deleted before it started)."""
    sure = maybe = (0, 0)
    for other in stored:
        if other is upload:
            continue
        gone = deleted.get(other.image_id)
        if other.answered < upload.started and (gone is None or gone.started > upload.answered):
            sure = (sure[0] + other.size, sure[1] + 1)
        if other.started < upload.answered and (gone is None or gone.answered > upload.started):
            maybe = (maybe[0] + other.size, maybe[1] + 1)
    return sure, maybe


def stored_past(upload, bounds, quotas):
    """Why a stored upload cannot have fitted beside what was surely there, or ''."""
    for label, (sure, _) in bounds.items():
        most_bytes, most_images = quotas[label]
        if ((most_images is not None and sure[1] + 1 > most_images)
                or (most_bytes is not None and sure[0] + upload.size > most_bytes)):
            return (f"image {upload.image_id} ({upload.size} bytes) stored past the quota of "
                    f"{label} {quotas[label]}: {sure} (bytes, images) were there already")
    return ""


def wrongly_refused(upload, bounds, quotas):
    """What is wrong with a quota's refusal, or '': it must name a quota the upload counts
    against, with its limit, a use between what was surely and maybe there, and no room."""
    label, limit, unit, used, length = QUOTA_REFUSAL.match(
        json.loads(upload.message)["message"]).groups()
    index = 0 if unit == "byte" else 1
    if label not in bounds or int(limit) != quotas[label][index]:
        return f"refused by {label}'s {limit} {unit}s, not a quota of this upload: {upload}"
    sure, maybe = (use[index] for use in bounds[label])
    need = 1 if unit == "image" else int(length or 1)  # a chunked body's length is unknown
    if not sure <= int(used) <= maybe or int(used) + need <= int(limit):
        return (f"refused by {label} with {used} {unit}s in use of {limit} (+{need}); "
                f"{sure} to {maybe} were there meanwhile")
    return ""


def check_quota_windows(ledger, quotas, figures):
    """Each upload that counts against a quota, stored or refused by one, against what the
    other uploads and the deletes may have left at its checks; how many of them were decided
    in a race (what was surely and what was maybe there differed)."""
    deleted = {s.image_id: s for s in ledger if s.method == "DELETE" and s.status == 204}
    stored = {label: [s for s in ledger if s.outcome == "stored" and label in s.quotas]
              for label in quotas}
    if not any(s.outcome in QUOTA_OUTCOMES for s in ledger):
        figures.error("no quota ever refused an upload: the load never reached the limits")
    decided = raced = 0
    for upload in ledger:
        if not upload.quotas or upload.outcome not in {"stored", *QUOTA_OUTCOMES}:
            continue
        bounds = {label: window_use(upload, stored[label], deleted) for label in upload.quotas}
        decided += 1
        raced += any(sure != maybe for sure, maybe in bounds.values())
        judge = stored_past if upload.outcome == "stored" else wrongly_refused
        if problem := judge(upload, bounds, quotas):
            figures.error(problem)
    return decided, raced


def check_final_quotas(service, quotas, figures):
    """Each quota's use at the end, from the database and from `quota show`: the same, and
    within its limit."""
    with Reader(service) as db:
        use = quota_use(db, quotas)
    with ThreadPoolExecutor(4) as pool:
        shown = dict(zip(quotas, pool.map(
            lambda label: shown_use(service.flask("quota", "show", quota_target(label))),
            quotas), strict=True))
    for label, limit in quotas.items():
        if use[label] != shown[label] or over_limit(use[label], limit):
            figures.error(f"{label} at the end: database {use[label]}, quota show "
                          f"{shown[label]}, limit {limit}")
    return use


@contextlib.contextmanager
def database_env(postgres):
    """The environment that puts a service's database on PostgreSQL, in a fresh schema of
    the database at the URL postgres, dropped after the block; {} (SQLite) without one."""
    if not postgres:
        yield {}
        return
    schemas = PostgresSchemas(postgres)  # the tests' own, named so that stale ones go
    try:
        yield {"DATABASE_URL": schemas.new()}
    finally:
        schemas.drop_all()


def scenario_counts(figures, base, clients, seconds, images, short, postgres=None):
    """Many clients of five users, four of them under quotas, mix every kind of upload and
    read for seconds on 2 workers, one of which is killed halfway; then /metrics, the audit
    log, the database and the quotas must agree with what the clients were answered. On
    SQLite, or on PostgreSQL at the URL postgres."""
    quotas, hostile = counts_quotas(short), make_hostile(base / "hostile")
    audit_log = base / "counts-audit.log"
    env = {"AUDIT_LOG": str(audit_log), "METRICS_TOKEN": METRICS_TOKEN, "MAX_IMAGE_SIZE": "4M"}
    with (database_env(postgres) as database,
          serving(base / "counts", figures, env | database, workers=2) as service):
        run = CountsRun(service, counts_accounts(service, quotas), images, hostile, figures)
        run.seed()
        with QuotaWatch(service, quotas, figures) as watch:
            run.start(clients)
            time.sleep(seconds / 2)
            victim = kill_between_steps(run, figures)
            time.sleep(seconds / 2)
            run.finish()
        scrapes = [scrape(service) for _ in range(4)]  # whichever worker answers
        if any(other != scrapes[0] for other in scrapes):
            figures.error("two scrapes differ: " + "; ".join(
                differences(scrapes[0], other) for other in scrapes if other != scrapes[0]))
        check_metrics(run.ledger, scrapes[0], figures)
        stored = check_stored(run, scrapes[0], figures)
        lines = check_audit_log(run.ledger, audit_log, figures)
        decided, raced = check_quota_windows(run.ledger, quotas, figures)
        final = check_final_quotas(service, quotas, figures)
        figures.notes[:0] = counts_notes(run, clients, seconds, victim, stored, len(lines),
                                         watch, (decided, raced), final, quotas)
        figures.notes[0] = f"on {'PostgreSQL' if postgres else 'SQLite'}: {figures.notes[0]}"


def counts_notes(run, clients, seconds, victim, stored, lines, watch, decisions, final, quotas):
    """The scenario's report: what was sent and answered, and how full each quota got."""
    outcomes = Counter(s.outcome for s in run.ledger if s.outcome)
    total, by_quota = sum(outcomes.values()), sum(outcomes[o] for o in QUOTA_OUTCOMES)
    by_file = sum(outcomes[rule] for rule in {rule for _, _, rule in HOSTILE_UPLOADS})
    other = total - outcomes["stored"] - by_quota - by_file - outcomes["broken_body"]
    fullest = "; ".join(f"{label} {describe_use(watch.fullest[label], quotas[label])} "
                        f"(at the end {describe_use(final[label], quotas[label])})"
                        for label in quotas)
    return [
        f"{sum(clients)} clients of {len(ROLES)} users for {seconds} s on 2 workers, worker "
        f"{victim} killed with kill -9 halfway, between two requests; {total} uploads "
        f"answered: {outcomes['stored']} stored, {by_quota} refused by a quota, {by_file} by a "
        f"rule of the file, {outcomes['broken_body']} cut off, {other} other refusals "
        f"({len(outcomes)} outcomes in all)",
        f"/metrics (uploads by outcome, requests, downloads, bytes sent, stored images: "
        f"{stored[0]} of {stored[1]} bytes), the audit log ({lines} lines), the database and "
        f"the store {'checked' if run.figures.errors else 'agree with'} the "
        f"{len(run.ledger)} answers",
        "by outcome: " + ", ".join(f"{o} {n}" for o, n in outcomes.most_common())
        + "; downloads: " + ", ".join(f"{via} {status} {n}" for (via, status), n in sorted(
            Counter((s.via, s.status) for s in run.ledger if s.via).items()))
        + "; " + ", ".join(f"{n} {what}" for what, n in sorted(Counter(
            f"{s.method} {s.status}" for s in run.ledger
            if not s.via and not s.outcome).items())) + " besides",
        f"quotas, fullest during the run and at the end: {fullest}; {watch.samples} samples "
        f"of the database, `quota show` at the end; {decisions[1]} of {decisions[0]} quota "
        f"decisions made while another upload of the quota was under way",
    ]


def describe_use(use, limit):
    """'5.9 of 6.0 MB, 11 images' for (bytes, images) used under (most bytes, most images)."""
    most_bytes, most_images = limit
    return (f"{use[0] / 1e6:.2f}" + (f" of {most_bytes / 1e6:.2f}" if most_bytes else "")
            + f" MB, {use[1]}" + (f" of {most_images}" if most_images else "") + " images")


# --- main -------------------------------------------------------------------------------

def table(results):
    lines = ["| scenario | requests | errors | lost | orphans | result |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for f in results:
        result = f"skipped: {f.skipped}" if f.skipped else ("ok" if f.ok else "FAILED")
        lines.append(f"| {f.name} | {f.requests} | {f.errors} | {f.lost} | {f.orphans} | "
                     f"{result} |")
    return "\n".join(lines)


SCENARIOS = ("load", "kill", "diskfull", "slow", "qemubusy", "dbdiskfull", "sweep", "silent",
             "counts")


def scenario_calls(base, short, disk, postgres=None):
    """Each scenario's name and a call that runs it on a Figures, short form or full."""
    images = [make_image(base / f"v{n}.qcow2", (n + 1) * 64 << 10, n + 1) for n in range(6)]
    big = make_image(base / "big.qcow2", 6 << 20, 0x5A)
    return {
        "load": lambda f: scenario_load(f, base, 8 if short else 16, 15 if short else 60, images),
        "kill": lambda f: scenario_kill(f, base, 6 if short else 15, big, images),
        "diskfull": lambda f: scenario_diskfull(f, base, big, images[0], disk),
        "slow": lambda f: scenario_slow(f, base, 50, 5 if short else 15, images[0],
                                        body_timeout=8 if short else 20),
        "qemubusy": lambda f: scenario_qemubusy(f, base, 6 if short else 20),
        "dbdiskfull": lambda f: scenario_dbdiskfull(f, base, big, images[0], disk),
        "sweep": lambda f: scenario_sweep(f, base, 8, 8 if short else 30, images),
        "silent": lambda f: scenario_silent(f, base, 600, 50, 8 if short else 30, images[0]),
        # Clients of bob, carol, dave, erin and frank (ROLES).
        "counts": lambda f: scenario_counts(f, base, (3, 2, 1, 1, 2) if short else (5, 3, 2, 2, 3),
                                            12 if short else 60, images, short, postgres),
    }


def run_scenario(name, call):
    """The scenario's figures; one that crashed fails with where and why, with what it had
    counted until then, and the run goes on."""
    figures = Figures(name)
    try:
        call(figures)
    except Exception as error:  # noqa: BLE001 - reported in the table, not raised
        here = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
        figures.errors += 1
        figures.notes.insert(0, f"crashed in {here[-1].name}, line {here[-1].lineno}: "
                                f"{error!r}")
    return figures


def parse_args(argv):
    """The options, with --only as a list of known scenario names."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the short form CI runs")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run, of {', '.join(SCENARIOS)}")
    parser.add_argument("--disk", choices=("tmpfs", "ext4"), default="tmpfs",
                        help="the small filesystem of the disk-full scenarios")
    parser.add_argument("--postgres", metavar="URL",
                        help="run counts on PostgreSQL, in a fresh schema of the database at "
                             "URL (the others always run on SQLite)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (instances, server logs) for a look after")
    args = parser.parse_args(argv)
    args.only = args.only.split(",")
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"no scenario {', '.join(sorted(unknown))}; there are "
                     f"{', '.join(SCENARIOS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.keep:
            base = Path(args.keep)
            base.mkdir(parents=True)
        else:
            base = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="imagestore-reliability-")))
        calls = scenario_calls(base, args.short, args.disk, args.postgres)
        results = [run_scenario(name, calls[name]) for name in SCENARIOS if name in args.only]
    print(table(results))
    for f in results:
        for note in f.notes:
            print(f"- {f.name}: {note}")
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
