#!/usr/bin/env python3
"""Reliability run against real gunicorn on loopback, each scenario on a fresh instance:

  load      N clients mix uploads, lists, downloads and deletes on 2 workers
  kill      kill -9 of a worker amid uploads and downloads, then a restart
  diskfull  uploads into a store on a small tmpfs (or loop-mounted ext4) until 507
  slow      50 clients send bodies at a few bytes a second while others are served

Prints a table of figures (requests, errors, lost, orphans) and exits 1 on any error,
loss or orphan. `--short` is the form CI runs. Needs qemu-img and qemu-io; the disk-full
scenario needs root to mount a small filesystem, and is skipped (said so) without it.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BIN = Path(sys.executable).parent
# What a client sees when the server's process dies under its request.
CUT_OFF = (OSError, http.client.HTTPException)
DISK = "application/octet-stream"


# --- the service -----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_web():
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return shlex.split(command)
    raise LookupError("no web line in Procfile")


class Service:
    """gunicorn started from the Procfile's web line on a loopback port, on one instance."""

    def __init__(self, instance, extra_env=None, workers=2):
        self.instance = Path(instance)
        self.port = free_port()
        self.env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1",
                    "IMAGESTORE_INSTANCE": str(self.instance), "WEB_CONCURRENCY": str(workers),
                    "PATH": f"{PYTHON_BIN}:{os.environ['PATH']}", **(extra_env or {})}
        for name in ("DATABASE_URL", "STORAGE_URL", "PUBLIC_URL"):
            if name not in (extra_env or {}):
                self.env.pop(name, None)
        self.log_path = self.instance / "gunicorn.log"
        self.process = None

    def start(self):
        self.instance.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the server's life
        self.process = subprocess.Popen(procfile_web(), cwd=ROOT, env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if request(self, "GET", "/healthz", timeout=2).status in (200, 503):
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not start:\n" + self.log_path.read_text()[-3000:])

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def worker_pids(self):
        """The master's children: the workers."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def flask(self, *args):
        result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args],
                                cwd=ROOT, env=self.env, check=True, capture_output=True,
                                text=True)
        return result.stdout.strip()

    def token(self, username):
        self.flask("user", "create", username, f"{username}@example.com")
        return self.flask("token", "create", username, "--scope", "image:read,write,delete")

    def log_text(self):
        return self.log_path.read_text(errors="replace")

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
        # FACTS.md: an early answer closes the socket; the answer is still there to read.
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


def audit(service):
    """Compare the database's rows with the store's files and its temporary folder."""
    with contextlib.closing(sqlite3.connect(f"file:{service.database}?mode=ro", uri=True)) as db:
        rows = dict(db.execute("SELECT storage_key, sha256 FROM image").fetchall())
    store = service.store
    files = {p.name[:-len(".qcow2")] for p in store.glob("*.qcow2")}
    temp = list((store / ".incoming").iterdir()) if (store / ".incoming").exists() else []
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
    listed = list_all(service, token)
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
            pick = rng.random()
            try:
                if pick < 0.35:
                    answer = self.upload(client, n, rng)
                elif pick < 0.6:
                    answer = self.get(f"/images?page={rng.randint(1, 3)}")
                elif pick < 0.85:
                    answer = self.download(rng)
                else:
                    answer = self.delete(rng)
            except CUT_OFF as error:
                self.figures.error(f"client {client}: {error!r}")
                continue
            if answer is not None:
                self.judge(answer)

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


def scenario_load(base, clients, seconds, images):
    figures = Figures("load")
    service = Service(base / "load").start()
    try:
        load = LoadClients(service, service.token("loader"), images, figures)
        load.run(clients, seconds)
        found = verify_outcome(service, load.token, load.created, load.deleted, figures)
        check_log(service, figures)
        figures.notes.insert(0, f"{clients} clients, {seconds} s, {len(load.created)} created, "
                                f"{len(load.deleted)} deleted, {found.rows} kept; "
                                f"{load.reused} ids of deleted images handed out again")
    finally:
        service.stop()
    return figures


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


def scenario_kill(base, seconds, big_image, images):
    figures = Figures("kill")
    service = Service(base / "kill").start()
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
    return figures


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


def scenario_diskfull(base, big_image, small_image, kind="tmpfs"):
    figures = Figures("diskfull")
    with small_filesystem(base / "diskfull-store", 64, kind) as (mount, how):
        if mount is None:
            figures.skipped = how
            return figures
        # A reserve below the disk's size, so that uploads are stored before they stop.
        service = Service(base / "diskfull", {"STORAGE_URL": f"file://{mount}/images",
                                              "MIN_FREE_SPACE": "8M"}).start()
        try:
            token = service.token("filler")
            created, full = {}, 0
            for n in range(40):  # 64 MiB fills well before 40 big images
                answer = request(service, "POST", f"/images?name=fill{n}", token,
                                 body=big_image)
                figures.count()
                if answer.status == 201:
                    created[answer.json()["id"]] = (f"fill{n}", sha256(big_image))
                elif answer.status == 507:
                    full += 1
                    if set(answer.json()) != {"message"}:
                        figures.error(f"507 body is not a message: {answer.body[:80]!r}")
                    if full >= 3:
                        break
                else:
                    figures.error(f"upload {answer.status} {answer.body[:80]!r}")
            if not full:
                figures.error("the store never filled up")
            after_full = audit(service)
            health = request(service, "GET", "/healthz")
            # Reads go on while the disk is full.
            for image_id in list(created)[:5]:
                answer = request(service, "GET", f"/images/{image_id}", token,
                                 headers={"Accept": DISK})
                figures.count()
                if answer.status != 200 or sha256(answer.body) != created[image_id][1]:
                    figures.error(f"read while full: {answer.status}")
            listed = request(service, "GET", "/images", token)
            figures.count()
            if listed.status != 200:
                figures.error(f"list while full: {listed.status}")
            # Room again after a delete: a small upload goes through.
            victim = next(iter(created))
            request(service, "DELETE", f"/images/{victim}", token)
            answer = request(service, "POST", "/images?name=after", token, body=small_image)
            figures.count(2)
            if answer.status == 201:
                created[answer.json()["id"]] = ("after", sha256(small_image))
            else:
                figures.error(f"upload after a delete: {answer.status}")
            verify_outcome(service, token, created, {victim: created[victim][0]}, figures)
            check_log(service, figures)
            figures.notes.insert(0, f"{how}; {len(created) - 1} images of "
                                    f"{len(big_image) >> 20} MiB stored, then {full} x 507; "
                                    f"temporary files when full: {after_full.temp_files}; "
                                    f"healthz when full: {health.status} "
                                    f"{health.body.decode().strip()}")
        finally:
            service.stop()
    return figures


# --- scenario: slow clients -------------------------------------------------------------

def open_slow_uploads(service, token, count, timeout):
    """count connections that have sent upload headers for a 64 KiB body, and no body."""
    sockets = []
    for n in range(count):
        s = socket.create_connection(("127.0.0.1", service.port), timeout=timeout)
        s.sendall((f"POST /images?name=slow{n} HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Length: {64 << 10}\r\n\r\n")
                  .encode())
        sockets.append(s)
    return sockets


@contextlib.contextmanager
def trickling(sockets):
    """Send 4 bytes a second on every socket while the block runs."""
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.send(b"QFI\xfb")

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fast_requests(service, token, seconds, image, timeout, figures):
    """List, health and upload in turn for seconds; return how many answers and the images."""
    fast, created, n = 0, {}, 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        n += 1
        for method, path, body in (("GET", "/images", None), ("GET", "/healthz", None),
                                   ("POST", f"/images?name=fast{n}", image)):
            try:
                answer = request(service, method, path, token, body=body, timeout=timeout)
            except CUT_OFF as error:
                figures.error(f"fast {method} {path}: {error!r}")
                continue
            figures.count()
            fast += 1
            if answer.status not in (200, 201):
                figures.error(f"fast {method} {path}: {answer.status}")
            elif method == "POST":
                created[answer.json()["id"]] = (f"fast{n}", sha256(image))
    return fast, created


def scenario_slow(base, slow_clients, seconds, small_image, body_timeout):
    figures = Figures("slow")
    service = Service(base / "slow", {"BODY_READ_TIMEOUT": str(body_timeout)}).start()
    try:
        token = service.token("patient")
        sockets = open_slow_uploads(service, token, slow_clients, body_timeout * 4)
        with trickling(sockets):
            time.sleep(1.5)  # let every slow body be in a worker thread's hands
            fast, created = fast_requests(service, token, seconds, small_image,
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
        check_log(service, figures)
        figures.notes.insert(0, f"{slow_clients} slow bodies at 4 bytes/s held open; "
                                f"{fast} fast requests served meanwhile; {dropped} slow "
                                f"bodies dropped with 408 after the body timeout")
    finally:
        service.stop()
    return figures


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


# --- main -------------------------------------------------------------------------------

def table(results):
    lines = ["| scenario | requests | errors | lost | orphans | result |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for f in results:
        result = f"skipped: {f.skipped}" if f.skipped else ("ok" if f.ok else "FAILED")
        lines.append(f"| {f.name} | {f.requests} | {f.errors} | {f.lost} | {f.orphans} | "
                     f"{result} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the short form CI runs")
    parser.add_argument("--only", default="load,kill,diskfull,slow",
                        help="comma-separated scenarios to run")
    parser.add_argument("--disk", choices=("tmpfs", "ext4"), default="tmpfs",
                        help="the small filesystem of the disk-full scenario")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (instances, server logs) for a look after")
    args = parser.parse_args(argv)
    short = args.short
    wanted = args.only.split(",")
    results = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            base = Path(args.keep)
            base.mkdir(parents=True)
        else:
            base = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="imagestore-reliability-")))
        images = [make_image(base / f"v{n}.qcow2", (n + 1) * 64 << 10, n + 1)
                  for n in range(6)]
        big = make_image(base / "big.qcow2", 6 << 20, 0x5A)
        if "load" in wanted:
            results.append(scenario_load(base, 8 if short else 16, 15 if short else 60, images))
        if "kill" in wanted:
            results.append(scenario_kill(base, 6 if short else 15, big, images))
        if "diskfull" in wanted:
            results.append(scenario_diskfull(base, big, images[0], args.disk))
        if "slow" in wanted:
            results.append(scenario_slow(base, 50, 5 if short else 15, images[0],
                                         body_timeout=8 if short else 20))
    print(table(results))
    for f in results:
        for note in f.notes:
            print(f"- {f.name}: {note}")
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
