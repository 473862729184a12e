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

Prints a table of figures (requests, errors, lost, orphans) and exits 1 on any error,
loss or orphan. `--short` is the form CI runs. Needs qemu-img and qemu-io (qemu-block-extra
for qemubusy's HTTP reads); the disk-full scenarios need root to mount a small filesystem,
and are skipped (said so) without it.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness import LiveServer  # noqa: E402 - found through the line above

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


def audit(service):
    """Compare the database's rows with the store's files and its temporary folder."""
    with contextlib.closing(sqlite3.connect(f"file:{service.database}?mode=ro", uri=True)) as db:
        rows = dict(db.execute("SELECT storage_key, sha256 FROM image").fetchall())
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


class Sweeper:
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

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


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


def qemu_filename(link):
    """The json: filename QEMU reads a link by: the answer's own, else one built alike from
    its url, giving each HTTP request 60 s instead of the curl driver's 5."""
    if link.get("qemu_json"):
        return link["qemu_json"], "qemu_json of the answer"
    spec = {"file": {"driver": "http", "url": link["url"], "timeout": 60}}
    return "json:" + json.dumps(spec), "json: built from url"


class QemuReads:
    """qemu-img convert of one image through its link, each under a hard timeout and
    compared with the original."""

    def __init__(self, original, source, figures, timeout):
        self.original, self.source, self.figures = original, source, figures
        self.timeout, self.seconds = timeout, []

    def convert(self, n):
        """One convert through the link into a copy, judged and then removed."""
        copy = self.original.with_name(f"copy{n}.qcow2")
        started = time.monotonic()
        done = subprocess.run(["timeout", "-k", "5", str(self.timeout), "qemu-img", "convert",
                               "-f", "qcow2", "-O", "qcow2", self.source, str(copy)],
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
        source, how = qemu_filename(link.json())
        reads = QemuReads(original, source, figures, timeout)
        with busy_host(runs * (timeout + 10) + 60):
            for n in range(runs):
                reads.convert(n)
        figures.notes.insert(0, f"{runs} converts of 8 MiB through the link ({how}) beside "
                                f"2 busy loops; each took {min(reads.seconds):.1f} to "
                                f"{max(reads.seconds):.1f} s (hard timeout {timeout} s)")


# --- main -------------------------------------------------------------------------------

def table(results):
    lines = ["| scenario | requests | errors | lost | orphans | result |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for f in results:
        result = f"skipped: {f.skipped}" if f.skipped else ("ok" if f.ok else "FAILED")
        lines.append(f"| {f.name} | {f.requests} | {f.errors} | {f.lost} | {f.orphans} | "
                     f"{result} |")
    return "\n".join(lines)


SCENARIOS = ("load", "kill", "diskfull", "slow", "qemubusy", "dbdiskfull", "sweep", "silent")


def scenario_calls(base, short, disk):
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
        calls = scenario_calls(base, args.short, args.disk)
        results = [run_scenario(name, calls[name]) for name in SCENARIOS if name in args.only]
    print(table(results))
    for f in results:
        for note in f.notes:
            print(f"- {f.name}: {note}")
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
