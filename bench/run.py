#!/usr/bin/env python3
"""Benchmarks: imagestore next to nginx and a Docker registry, on loopback, in one run.

Start with `bench/run` (it installs nginx, docker-registry, wrk and matplotlib when missing).
Everything measured is started here on 127.0.0.1 and stopped at the end; files go to a
temporary folder that is removed afterwards. Results: a table of figures, ratios and goals
(PASS/MISS) on stdout, with the command and the machine's load before and after, and
bench/out/results.json, bench/out/report.md and bench/out/throughput.png (`--record` also
copies the chart to docs/benchmarks-throughput.png).

Each figure is the median of five repetitions (with min and max). imagestore and its
reference take turns (A B, then B A, ...), and a ratio is given per pair of runs taken next
to each other, as median [min-max], so that one noisy run can neither make nor break it.
Before each timed transfer the dirty pages are synced and a file of the same size is written
and deleted, so that every server writes into warm page cache (docs/platform.md, "Measuring
on these VMs"). Downloads from the page cache run with the server and curl on cores of their
own, three turns of each server a repetition (download_turns).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DOCS_CHART = ROOT / "docs" / "benchmarks-throughput.png"
sys.path.insert(0, str(ROOT))  # the project's modules, for inspection and the list page
import refusal  # noqa: E402 - bench/refusal.py, next to this script
import resumable  # noqa: E402 - bench/resumable.py, next to this script

from harness import (  # noqa: E402 - found through the line above
    child_pids,
    free_port,
    launch,
    procfile_command,
    start_server,
    stop_process,
)
from resumablehash import file_sha256 as sha256_file  # noqa: E402 - the project's

MiB = 1 << 20
GiB = 1 << 30
TOOLS = ("curl", "qemu-img", "nginx", "docker-registry", "wrk")
SERVERS = ("imagestore", "nginx", "registry")
BENCH_APP = "benchwsgi:app"


# ---------------------------------------------------------------- settings


def settings(args):
    """Sizes, repetitions and durations for a full or a --quick run."""
    if args.quick:
        return {"sizes": [8 * MiB, 32 * MiB], "reps": args.reps or 1, "list_sizes": (1000, 5000),
                "wrk_seconds": 1, "wrk_reps": args.reps or 1, "inspect_reps": 3,
                "refusal_sizes": (256 * MiB, 4 * MiB), "refusal_reps": args.reps or 2,
                "metrics_images": 5000,
                "resumable": (64 * MiB, 8 * MiB), "resumable_reps": args.reps or 1}
    return {"sizes": [16 * MiB, 64 * MiB, 256 * MiB, GiB], "reps": args.reps or 5,
            "list_sizes": (1000, 100_000), "wrk_seconds": 3, "wrk_reps": args.reps or 5,
            "inspect_reps": 9, "refusal_sizes": (4 * GiB, 4 * MiB),
            "refusal_reps": args.reps or 5, "metrics_images": 100_000,
            "resumable": (GiB, 64 * MiB), "resumable_reps": args.reps or 5}


def human_size(n):
    """16 MiB, 1 GiB."""
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


def cfg_size(nbytes):
    """The nominal size (16 MiB, 1 GiB) of a test file that is just under it."""
    return -(-nbytes // MiB) * MiB


def spread(values):
    """(median, min, max) of some measurements."""
    return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------- processes


def bench_command():
    """The Procfile's web line serving bench/benchwsgi.py's app (wsgi:app and a trivial route)
    instead of wsgi:app, under the same gunicorn.conf.py."""
    command = procfile_command()
    if "wsgi:app" not in command:
        raise LookupError(f"the Procfile's web line serves no wsgi:app: {command}")
    return [BENCH_APP if word == "wsgi:app" else word for word in command] + [
        "--pythonpath", str(ROOT / "bench")]


def start_imagestore(work, stack):
    """gunicorn as the Procfile starts it, 2 workers, instance in work/instance; its errors
    (not its access log) in bench/out/gunicorn.log, this run's only."""
    log = OUT / "gunicorn.log"
    log.unlink(missing_ok=True)
    # DOWNLOAD_ALLOW_HOSTS: the import part fetches from nginx on 127.0.0.1.
    server = start_server(work / "instance", {"DOWNLOAD_ALLOW_HOSTS": "127.0.0.1"},
                          log_path=log, access_log=False, command=bench_command())
    stack.callback(server.stop)
    return server


NGINX_CONF = """\
{user}worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/files;
        client_max_body_size 0;
        location /dav/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
        }}
    }}
}}
"""


def start_nginx(work, stack):
    """nginx with its own config: static files and WebDAV PUT into work/nginx/files/dav."""
    folder = work / "nginx"
    (folder / "files" / "dav").mkdir(parents=True)
    port = free_port()
    # Workers run as root only when we are root: they must write into our private folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, dir=folder, port=port))
    url = f"http://127.0.0.1:{port}"
    process = launch(["nginx", "-p", str(folder), "-e", str(folder / "error.log"), "-c",
                      str(conf), "-g", "daemon off;"], f"{url}/")
    stack.callback(stop_process, process)
    return {"url": url, "process": process, "files": folder / "files" / "dav"}


REGISTRY_CONF = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {dir}/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def start_registry(work, stack):
    """Debian's docker-registry, filesystem storage in work/registry, no cache, no auth."""
    folder = work / "registry"
    folder.mkdir()
    port = free_port()
    conf = folder / "config.yml"
    conf.write_text(REGISTRY_CONF.format(dir=folder, port=port))
    url = f"http://127.0.0.1:{port}"
    process = launch(["docker-registry", "serve", str(conf)], f"{url}/v2/")
    stack.callback(stop_process, process)
    return {"url": url, "process": process, "storage": folder / "storage"}


# ---------------------------------------------------------------- files and cache


def make_qcow2(path, size):
    """A qcow2 file just under `size` bytes, full of random data (nothing compresses or skips).

    Just under: curl's --data-binary reads the file into memory and refuses more than 1 GiB.
    """
    raw = path.with_suffix(".raw")
    block = os.urandom(MiB)
    with open(raw, "wb") as f:
        for n in range(size // MiB - 1):  # one MiB left for the qcow2 header and tables
            f.write(block if n % 2 else os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()
    return path


def warm_page_cache(work, size):
    """Flush dirty pages, then write and delete `size` bytes: the next writes find warm pages."""
    os.sync()
    path = work / "warm.tmp"
    block = bytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(-(-size // MiB)):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


def disk_limit(work, size):
    """Seconds to write `size` bytes into warm cache and fsync them: a durable store's floor."""
    warm_page_cache(work, size)
    path = work / "disk.tmp"
    block = os.urandom(MiB)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(size // MiB):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


# ---------------------------------------------------------------- transfers


def curl(*args, out="/dev/null", headers_file=None):
    """Run curl; return (status, seconds, bytes received) from curl's own count and timer.

    `Expect:` turns off curl's 100-continue wait for large bodies, for every server alike.
    """
    cmd = ["curl", "-sS", "-o", out, "-w", "%{http_code} %{time_total} %{size_download}",
           "-H", "Expect:"]
    if headers_file:
        cmd += ["-D", str(headers_file)]
    result = subprocess.run([*cmd, *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"curl {' '.join(map(str, args))}: {result.stderr.strip()}")
    status, seconds, received = result.stdout.split()
    return int(status), float(seconds), int(received)


def expect(status, wanted, what):
    if status not in wanted:
        raise RuntimeError(f"{what}: HTTP {status}")


class Imagestore:
    """Upload, download and delete through imagestore's API."""

    name = "imagestore"

    def __init__(self, server, token, work):
        self.server, self.work = server, work
        self.auth = f"Authorization: Bearer {token}"
        self.last = None
        self.count = 0

    def pids(self):
        return self.server.worker_pids()

    def upload(self, path, digest):
        self.count += 1
        reply = self.work / "reply.json"
        url = f"{self.server.url}/images?name=bench-{self.count}"
        status, seconds, _ = curl("-H", self.auth, "--data-binary", f"@{path}", url, out=reply)
        expect(status, (201,), f"imagestore upload {reply.read_text()[:200]}")
        self.last = json.loads(reply.read_text())["id"]
        return seconds, path.stat().st_size

    def download(self):
        status, seconds, nbytes = curl("-H", self.auth, "-H", "Accept: application/octet-stream",
                               f"{self.server.url}/images/{self.last}")
        expect(status, (200,), "imagestore download")
        return seconds, nbytes

    def remove(self):
        if self.last is not None:
            status, _, _ = curl("-X", "DELETE", "-H", self.auth,
                             f"{self.server.url}/images/{self.last}")
            expect(status, (204,), "imagestore delete")
            self.last = None


class Nginx:
    """WebDAV PUT and static GET."""

    name = "nginx"

    def __init__(self, server):
        self.server = server
        self.count = 0

    def pids(self):
        return [self.server["process"].pid, *child_pids(self.server["process"].pid)]

    def upload(self, path, digest):
        self.count += 1
        status, seconds, _ = curl("-X", "PUT", "--data-binary", f"@{path}", self.url())
        expect(status, (201, 204), "nginx PUT")
        return seconds, path.stat().st_size

    def url(self):
        return f"{self.server['url']}/dav/bench-{self.count}.qcow2"

    def download(self):
        status, seconds, nbytes = curl(self.url())
        expect(status, (200,), "nginx GET")
        return seconds, nbytes

    def remove(self):
        for leftover in self.server["files"].iterdir():
            leftover.unlink()


class Registry:
    """A blob upload as docker push makes it (POST, then one PUT with the digest), blob GET."""

    name = "registry"

    def __init__(self, server, work):
        self.server, self.work = server, work
        self.digest = None

    def pids(self):
        return [self.server["process"].pid]

    def upload(self, path, digest):
        headers = self.work / "headers.txt"
        start = f"{self.server['url']}/v2/bench/blobs/uploads/"
        status, start_seconds, _ = curl("-X", "POST", start, headers_file=headers)
        expect(status, (202,), "registry upload start")
        location = re.search(r"^location:\s*(\S+)", headers.read_text(), re.I | re.M).group(1)
        if location.startswith("/"):
            location = self.server["url"] + location
        separator = "&" if "?" in location else "?"
        status, seconds, _ = curl("-X", "PUT", "-H", "Content-Type: application/octet-stream",
                               "--data-binary", f"@{path}",
                               f"{location}{separator}digest=sha256:{digest}")
        expect(status, (201,), "registry upload")
        self.digest = digest
        return start_seconds + seconds, path.stat().st_size

    def download(self):
        status, seconds, nbytes = curl(f"{self.server['url']}/v2/bench/blobs/sha256:{self.digest}")
        expect(status, (200,), "registry blob GET")
        return seconds, nbytes

    def remove(self):
        # Without this the registry sees the blob is there and skips storing the next one.
        shutil.rmtree(self.server["storage"] / "docker" / "registry" / "v2" / "blobs",
                      ignore_errors=True)


class RssWatch:
    """Peak RSS growth of gunicorn's workers while a block runs (VmHWM reset, else sampled)."""

    def __init__(self, pids):
        self.pids = pids

    def __enter__(self):
        self.before = {pid: self.status(pid, "VmRSS") for pid in self.pids}
        self.reset = all(self.reset_peak(pid) for pid in self.pids)
        self.peak = dict(self.before)
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        if self.reset:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], self.status(pid, "VmHWM"))
        self.growth = max(self.peak[pid] - self.before[pid] for pid in self.pids)

    def sample(self):
        while self.running:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], self.status(pid, "VmRSS"))
            time.sleep(0.005)

    @staticmethod
    def status(pid, field):
        """A /proc/PID/status field in bytes."""
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024

    @staticmethod
    def reset_peak(pid):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


def proc_stat(pids, *indexes):
    """Sums of /proc/PID/stat fields (numbered as in proc(5)) over these processes; each
    field counts all of a process's threads."""
    totals = [0] * len(indexes)
    for pid in pids:
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        for i, index in enumerate(indexes):
            totals[i] += int(fields[index - 3])
    return totals


def cpu_seconds(pids):
    """User + system CPU time used so far by these processes (all their threads)."""
    utime, stime = proc_stat(pids, 14, 15)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def minor_faults(pids):
    """Minor page faults of these processes so far (minflt: a page mapped without disk I/O,
    such as a fresh page of a new buffer being zeroed)."""
    return proc_stat(pids, 10)[0]


@contextlib.contextmanager
def cores_apart(pids):
    """The server's processes (every thread) on the first core and this script, so the curl
    it starts, on the second, then back on all of them. A download over loopback ran at
    0.9-1.2 GiB/s with curl on the server's core and 1.2-2.0 with it on the other
    (docs/benchmarks.md, "Downloads: where the scheduler puts curl"): left to the
    scheduler, that coin decided the ratio. On one core there is nothing to place."""
    usable = set(os.sched_getaffinity(0))
    if len(usable) < 2:
        yield
        return
    server_core, client_core = sorted(usable)[:2]
    try:
        _set_affinity(pids, {server_core})
        os.sched_setaffinity(0, {client_core})
        yield
    finally:
        os.sched_setaffinity(0, usable)
        # Threads the server started meanwhile (gunicorn's pool grows) inherited the core.
        _set_affinity(pids, usable)


def _set_affinity(pids, cpus):
    """Every thread of these processes on cpus (a thread that has just ended is skipped)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)


def timed(client, action, args, results, way, watch_memory, apart=False):
    """Run one transfer; note its rate, the server's CPU and minor page faults per GiB, and
    (maybe) the workers' peak RSS growth. apart: the server and curl on cores of their own
    (cores_apart)."""
    pids = client.pids()
    cpu_before, faults_before = cpu_seconds(pids), minor_faults(pids)
    with (RssWatch(pids) if watch_memory else contextlib.nullcontext() as watch,
          cores_apart(pids) if apart else contextlib.nullcontext()):
        seconds, nbytes = action(*args)
    results[way].append(nbytes / seconds)
    results[f"{way}_cpu"].append((cpu_seconds(pids) - cpu_before) / nbytes * GiB)
    results[f"{way}_faults"].append((minor_faults(pids) - faults_before) / nbytes * GiB)
    if watch_memory:
        results[f"{way}_memory"].append(watch.growth)


def turn_order(clients, rep):
    """Who goes in repetition rep: imagestore and nginx take turns going first (A B, B A,
    ...), always next to each other, so each pair of runs saw the same machine; the
    registry, a second reference, goes last."""
    first, second, *rest = clients
    return [first, second, *rest] if rep % 2 == 0 else [second, first, *rest]


RUN_KEYS = ("upload", "download", "upload_cpu", "download_cpu", "upload_faults",
            "download_faults", "upload_memory", "download_memory", "first_download",
            "first_download_cpu", "first_download_faults", "free_download",
            "free_download_cpu", "free_download_faults")


# Downloads of one repetition per server, taking turns: a download from the page cache is
# over in a second, and the host's noise moves it between 0.8 and 1.9 GiB/s from one
# second to the next (docs/benchmarks.md, "Downloads: where the scheduler puts curl").
DOWNLOAD_TURNS = 3


def download_turns(order, runs, watch_memory):
    """The downloads from the page cache: DOWNLOAD_TURNS of each server, taking turns
    (A B, B A, A B), with the server and curl on cores of their own (the figure with the
    goal), each followed by one placed by the scheduler. A server's run is the median of its
    turns (its CPU and page faults likewise; the memory of the first turn)."""
    turns = {name: {key: [] for key in RUN_KEYS} for name in runs}
    for turn in range(DOWNLOAD_TURNS):
        for client in order if turn % 2 == 0 else order[::-1]:
            watch = watch_memory and turn == 0 and client.name == "imagestore"
            timed(client, client.download, (), turns[client.name], "download", watch, True)
            timed(client, client.download, (), turns[client.name], "free_download", False)
    for name, measured in turns.items():
        for key, values in measured.items():
            if values:
                runs[name][key].append(max(values) if key.endswith("_memory")
                                       else statistics.median(values))


def transfer_reps(cfg, work, clients, path, digest, watch_memory):
    """cfg["reps"] repetitions of upload then download of one file, with each server in
    turn; the page cache is warmed before every timed transfer.

    Each download is timed first with the file as the server's upload left it (nginx's
    and the registry's in the page cache, imagestore's not: it writes around it,
    directio.py), then from the page cache on every side, the same state for all: the
    figure with the goal (download_turns)."""
    nbytes = path.stat().st_size
    runs = {c.name: {k: [] for k in RUN_KEYS} for c in clients}
    for rep in range(cfg["reps"]):
        order = turn_order(clients, rep)
        for client in order:
            client.remove()
            warm_page_cache(work, nbytes)
            watch = watch_memory and client.name == "imagestore"
            timed(client, client.upload, (path, digest), runs[client.name], "upload", watch)
        for client in order:
            warm_page_cache(work, nbytes)
            timed(client, client.download, (), runs[client.name], "first_download", False)
        download_turns(order, runs, watch_memory)
        line = "  ".join(f"{n} up {r['upload'][-1] / MiB:.0f} down "
                         f"{r['download'][-1] / MiB:.0f}" for n, r in runs.items())
        print(f"    rep {rep + 1} ({' '.join(c.name for c in order)}): {line} MiB/s",
              flush=True)
    return runs


def bench_transfers(cfg, work, clients):
    """Upload and download each size with each server, in turns.

    Returns, per size and server, the lists of rates (bytes/s), server CPU seconds and minor
    page faults per GiB and, for imagestore at the largest size, the workers' peak RSS growth.
    """
    results = {"sizes": [], "servers": {c.name: [] for c in clients}, "disk_fsync": []}
    for size in cfg["sizes"]:
        path = make_qcow2(work / f"bench-{size}.qcow2", size)
        digest = sha256_file(path)
        results["sizes"].append(path.stat().st_size)
        print(f"  {human_size(size)} ({path.stat().st_size} bytes)", flush=True)
        runs = transfer_reps(cfg, work, clients, path, digest, size == cfg["sizes"][-1])
        for client in clients:
            client.remove()
            results["servers"][client.name].append(runs[client.name])
        results["disk_fsync"].append([path.stat().st_size / disk_limit(work, size)
                                      for _ in range(3)])
        path.unlink()
    return results


# ---------------------------------------------------------------- early refusal


REFUSAL_SECONDS_PER_GIB = 120  # a guard against a hang only: even a busy machine reads faster
# The page cache warmed before every hostile body, large or small: the most the goal lets
# the server take. Warming for the body's own size put the kernel's freeing of 4 GiB of
# cache into the large body's time (docs/benchmarks.md, "The early
# refusal's time…").
REFUSAL_WARM = 64 * MiB


def refusal_pair_order(rep):
    """Which body goes first in repetition rep: large, small in repetitions 1 and 2, small,
    large in 3 and 4, and so on, so that each hostile kind (they alternate) gets both orders."""
    return ("large", "small") if rep // 2 % 2 == 0 else ("small", "large")


def bench_refusal(cfg, work, server, token):
    """Hostile uploads with a large and a small Content-Length, in pairs taking turns; the
    kinds (a VMDK descriptor, a qcow2 header with a backing file) alternate between pairs.
    The page cache is warmed alike (REFUSAL_WARM) before each.

    Returns {"kinds": [the kind of each pair], "large" | "small": [Refusal as a dict, with
    its kind, one per pair]}.
    """
    sizes = dict(zip(("large", "small"), cfg["refusal_sizes"], strict=True))
    heads = list(refusal.hostile_heads(work).items())
    results = {"kinds": [], "large": [], "small": []}
    for rep in range(cfg["refusal_reps"]):
        kind, head = heads[rep % len(heads)]
        results["kinds"].append(kind)
        for label in refusal_pair_order(rep):
            warm_page_cache(work, REFUSAL_WARM)
            timeout = 60 + REFUSAL_SECONDS_PER_GIB * sizes[label] / GiB
            got = refusal.send_hostile(server.url, token, head, sizes[label], timeout)
            results[label].append({"kind": kind, **dataclasses.asdict(got)})
        line = "; ".join(f"{human_size(sizes[label])} body {r['status']} after "
                         f"{r['seconds'] * 1e3:.0f} ms, {r['server_took'] / MiB:.1f} MiB taken"
                         for label in ("large", "small") for r in results[label][-1:])
        print(f"    rep {rep + 1}, {kind}: {line}", flush=True)
    return results


# ---------------------------------------------------------------- resumable uploads


def bench_resumable(cfg, work, server, token):
    """A tus upload in pieces against a single POST /images of the same file, in pairs
    taking turns (bench/resumable.py); the page cache is warmed before each, and the image
    removed after. Returns {"size", "piece", "post": [rates], "tus": [rates]}."""
    size, piece = cfg["resumable"]
    path = make_qcow2(work / "resumable.qcow2", size)
    auth = {"Authorization": f"Bearer {token}"}
    results = {"size": path.stat().st_size, "piece": piece, "post": [], "tus": []}
    for rep in range(cfg["resumable_reps"]):
        for way in ("post", "tus") if rep % 2 == 0 else ("tus", "post"):
            warm_page_cache(work, size)
            name = f"resumable-{rep}-{way}"
            seconds, image_id = (resumable.single_post(server.port, auth, path, name)
                                 if way == "post" else
                                 resumable.tus_upload(server.port, auth, path, name, piece))
            results[way].append(results["size"] / seconds)
            resumable.remove(server.port, auth, image_id)
        print(f"    rep {rep + 1}: POST /images {results['post'][-1] / MiB:.0f}, tus in "
              f"{human_size(piece)} pieces {results['tus'][-1] / MiB:.0f} MiB/s", flush=True)
    path.unlink()
    return results


def resumable_rows(rs):
    size, piece = human_size(cfg_size(rs["size"])), human_size(rs["piece"])
    return [(f"resumable upload {size} in {piece} pieces (tus `PATCH /uploads/:id`)",
             fmt_rate(rs["tus"]), f"single `POST /images`: {fmt_rate(rs['post'])}",
             ratio(rs["tus"], rs["post"]), pair_goal(rs["tus"], rs["post"], 0.9))]


# ---------------------------------------------------------------- inspection


def bench_inspection(cfg, work):
    """Time qcow2.inspect_qcow2 on a 16 MiB- and a 16 GiB-virtual image (and one with data)."""
    import qcow2

    images = {}
    for label, size in (("16 MiB virtual", "16M"), ("16 GiB virtual", "16G")):
        path = work / f"inspect-{size}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
        images[label] = path
    data_size = cfg["sizes"][-1]
    images[f"{human_size(data_size)} of data"] = make_qcow2(work / "inspect-data.qcow2", data_size)
    times = {}
    for label, path in images.items():
        qcow2.inspect_qcow2(str(path), 2 << 40)  # one untimed run: page cache, imports
        runs = []
        for _ in range(cfg["inspect_reps"]):
            start = time.perf_counter()
            qcow2.inspect_qcow2(str(path), 2 << 40)
            runs.append(time.perf_counter() - start)
        times[label] = runs
        path.unlink()
    return times


# ---------------------------------------------------------------- import from a URL


def finish_import(image_id, timeout=3600):
    """Wait until the server's job threads have finished the import, as deployed: its row's
    download_finished_at is set (read every 10 ms, which is the resolution of the time)."""
    from models import Image, db

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connection_context():
            if Image.get_by_id(image_id).download_finished_at is not None:
                return
        time.sleep(0.01)  # the row is all there is to watch from outside the server
    raise RuntimeError(f"import {image_id} not finished after {timeout} s")


def timed_import(server, token, url, work, number):
    """Seconds from the POST of an import of url to its finished row; the image deleted."""
    from models import Image

    reply, auth = work / "import.json", f"Authorization: Bearer {token}"
    body = json.dumps({"name": f"import-{number}", "download_url": url})
    start = time.perf_counter()
    status, _, _ = curl("-H", auth, "-H", "Content-Type: application/json", "--data-binary",
                        body, f"{server.url}/images", out=reply)
    expect(status, (201,), f"import POST {reply.read_text()[:200]}")
    image_id = json.loads(reply.read_text())["id"]
    finish_import(image_id)
    seconds = time.perf_counter() - start
    error = Image.get_by_id(image_id).download_error
    if error:
        raise RuntimeError(f"import of {url}: {error}")
    status, _, _ = curl("-X", "DELETE", "-H", auth, f"{server.url}/images/{image_id}")
    expect(status, (204,), "delete the imported image")
    return seconds


def bench_import(cfg, work, server, token, nginx):
    """An import of the largest size from nginx against `curl -o` of the same URL, taking
    turns, the page cache warmed before each: {"import": [B/s], "curl": [B/s]}."""
    from app import create_app

    # The server's database, to read the rows from; the server's workers do the imports.
    create_app(instance_path=str(server.instance), prepare=False)
    path = make_qcow2(nginx["files"].parent / "import.qcow2", cfg["sizes"][-1])
    url, size = f"{nginx['url']}/import.qcow2", path.stat().st_size
    runs = {"import": [], "curl": []}
    for rep in range(cfg["reps"]):
        for way in ("import", "curl") if rep % 2 == 0 else ("curl", "import"):
            warm_page_cache(work, size)
            if way == "import":
                seconds = timed_import(server, token, url, work, rep)
            else:
                status, seconds, _ = curl(url, out=str(work / "curl.qcow2"))
                expect(status, (200,), "curl -o from nginx")
                (work / "curl.qcow2").unlink()
            runs[way].append(size / seconds)
        print(f"    rep {rep + 1}: import {runs['import'][-1] / MiB:.0f} MiB/s, curl -o "
              f"{runs['curl'][-1] / MiB:.0f} MiB/s", flush=True)
    path.unlink()
    return {"size": size, **runs}


def import_rows(im):
    """The import against curl -o, per pair of runs."""
    size = human_size(cfg_size(im["size"]))
    return [(f"import {size} from nginx (`POST /images` with `download_url`, to the file "
             "stored and recorded)", fmt_rate(im["import"]),
             f"`curl -o` of the same URL: {fmt_rate(im['curl'])}",
             ratio(im["import"], im["curl"]), pair_goal(im["import"], im["curl"], 0.8))]


# ---------------------------------------------------------------- list page


def seed_accounts():
    """bench's namespaces; `other`, who shares one namespace with bench; `few`, who owns 1 in
    100 of the images. Returns the users, the namespaces, and a token of few's."""
    from auth import issue_token
    from models import Collaborator, User, db
    from namespaces import ensure_namespace

    users = {"bench": User.get(User.username == "bench")}
    for name in ("other", "few"):
        users[name] = User.create(username=name, email=f"{name}@example.com")
    with db.atomic():
        namespaces = {f"proj{k}": ensure_namespace(users["bench"], (f"proj{k}",))
                      for k in range(1, 9)}
        namespaces["shared"] = ensure_namespace(users["other"], ("shared",))
        namespaces["private"] = ensure_namespace(users["other"], ("private",))
        namespaces["few"] = ensure_namespace(users["few"], ("mine",))
        Collaborator.create(namespace=namespaces["shared"], user=users["bench"])
    return users, namespaces, issue_token(users["few"], {"image:read"})


def seed_images(start, stop, users, namespaces, base_time):
    """Insert rows for bench's listed images start..stop-1 directly (no files: a list never
    opens them), with the other users' images between them.

    bench owns eight in nine, in its own namespaces; one in nine is in other's namespace that
    bench collaborates on. For every ten of these, other has one more in a private namespace
    that bench must not see; for every hundred, few has one.
    """
    from models import Image, db

    def row(key, owner, author, ns):
        return {"author": author, "user": owner, "namespace": ns, "name": key,
                "storage_key": f"bench-{key}", "size": 200 * MiB, "virtual_size": 8 * GiB,
                "sha256": hashlib.sha256(key.encode()).hexdigest(),
                "created_at": base_time + timedelta(seconds=i)}

    bench, other, few = users["bench"], users["other"], users["few"]
    rows = []
    for i in range(start, stop):
        if i % 9 == 0:
            rows.append(row(f"img{i}", other, bench, namespaces["shared"]))
        else:
            rows.append(row(f"img{i}", bench, bench, namespaces[f"proj{i % 9}"]))
        if i % 10 == 5:
            rows.append(row(f"private{i}", other, other, namespaces["private"]))
        if i % 100 == 50:
            rows.append(row(f"few{i}", few, few, namespaces["few"]))
    with db.atomic():
        for batch in range(0, len(rows), 1000):
            Image.insert_many(rows[batch:batch + 1000]).execute()


def count_statements(app, token, path):
    """SQL statements one request runs, counted by SQLite's own trace hook on a new connection."""
    from models import db, release_connections

    database = db.obj
    statements = []
    original = database._add_conn_hooks

    def hooked(conn):
        conn.set_trace_callback(statements.append)
        original(conn)

    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    release_connections()
    database._add_conn_hooks = hooked
    try:
        response = client.get(path, headers=headers)
    finally:
        database._add_conn_hooks = original
        release_connections()  # the traced connection must not go back into the pool
    if response.status_code != 200 or len(response.json) != 25:
        raise RuntimeError(f"list page: {response.status_code} {str(response.json)[:200]}")
    queries = [s for s in statements if not s.lstrip().upper().startswith("PRAGMA")]
    return {"queries": len(queries), "pragmas": len(statements) - len(queries),
            "statements": statements}


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(url, token, connections, seconds, headers=()):
    """Requests/s and median latency from wrk (token None: no Authorization header)."""
    threads = min(2, connections)
    headers = [*headers, *([f"Authorization: Bearer {token}"] if token else [])]
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         *(arg for header in headers for arg in ("-H", header)), url],
        check=True, capture_output=True, text=True)
    text = result.stdout
    if "Non-2xx" in text or "Socket errors" in text:
        raise RuntimeError(f"wrk saw errors on {url}:\n{text}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    value, unit = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)", text, re.M).groups()
    return rps, float(value) * UNITS[unit]


def list_rps(page_url, trivial_url, token, seconds, reps):
    """Requests/s (wrk -c8) of the list page and of the trivial route, taking turns (each
    goes first in every other repetition): {"list": [...], "trivial": [...]}."""
    runs = {"trivial": [], "list": []}
    order = [("trivial", trivial_url), ("list", page_url)]
    for rep in range(reps):
        for name, url in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(wrk(url, token, 8, seconds)[0])
    return runs


def bench_list(cfg, server, token):
    """Requests/s of the list page against the trivial route; latency of pages 1 and 40 as the
    store grows; SQL statements per list request."""
    from app import create_app

    app = create_app(instance_path=str(server.instance))
    with app.app_context():
        users, namespaces, few_token = seed_accounts()
    results = {"rps": {}, "latency": {}, "sql": {}}
    seeded = 0
    seconds, reps = cfg["wrk_seconds"], cfg["wrk_reps"]
    trivial = f"{server.url}/_bench/trivial"
    for total in cfg["list_sizes"]:
        with app.app_context():
            seed_images(seeded, total, users, namespaces, datetime(2020, 1, 1))
        seeded = total
        print(f"  bench sees {total} images", flush=True)
        with app.app_context():
            results["sql"][str(total)] = {
                str(page): count_statements(app, token, f"/images?page={page}")
                for page in (1, 40)}
        wrk(f"{server.url}/images", token, 1, 1)  # warm up: caches, connections
        lists = [("bench", token)]
        if total == cfg["list_sizes"][-1]:
            lists.append(("few", few_token))  # 1 in 100 of the store's images
        for who, secret in lists:
            for page in (1, 40):
                url = f"{server.url}/images?page={page}"
                results["latency"][f"{who}/{total}/{page}"] = [wrk(url, secret, 1, seconds)[1]
                                                                for _ in range(reps)]
        results["rps"][str(total)] = list_rps(f"{server.url}/images?page=1", trivial, token,
                                              seconds, reps)
    return results


# ---------------------------------------------------------------- Range requests

# One read of QEMU's curl block driver: its readahead is 256 KiB, a request a read.
RANGE_HEADER = f"Range: bytes={MiB}-{MiB + 256 * 1024 - 1}"
RANGE_FILE_SIZE = 64 * MiB
RANGE_WAYS = ("link", "api", "nginx")


def bench_ranges(cfg, work, server, token, nginx):
    """Requests/s (wrk -c1) of a 256 KiB Range request, as QEMU booting from a URL makes
    them: through a signed link, through GET /images/:id with the token, and from nginx's
    copy of the same file, taking turns: {"link": [...], "api": [...], "nginx": [...]}."""
    path = make_qcow2(nginx["files"].parent / "ranges.qcow2", RANGE_FILE_SIZE)
    client = Imagestore(server, token, work)
    client.upload(path, None)
    reply = work / "link.json"
    status, _, _ = curl("-X", "POST", "-H", client.auth,
                        f"{server.url}/images/{client.last}/links", out=reply)
    expect(status, (201,), "imagestore link")
    targets = {"link": (json.loads(reply.read_text())["url"], None, ()),
               "api": (f"{server.url}/images/{client.last}", token,
                       ("Accept: application/octet-stream",)),
               "nginx": (f"{nginx['url']}/ranges.qcow2", None, ())}
    runs = {way: [] for way in RANGE_WAYS}
    for rep in range(cfg["wrk_reps"]):
        for way in RANGE_WAYS if rep % 2 == 0 else RANGE_WAYS[::-1]:
            url, secret, headers = targets[way]
            runs[way].append(wrk(url, secret, 1, cfg["wrk_seconds"],
                                 (RANGE_HEADER, *headers))[0])
        print(f"    rep {rep + 1}: " + ", ".join(f"{way} {runs[way][-1]:.0f}"
                                                for way in RANGE_WAYS) + " req/s", flush=True)
    client.remove()
    path.unlink()
    return runs


def range_rows(rg):
    """The Range requests of imagestore's two ways against nginx's."""
    ways = {"link": "a signed link (`GET /links/…`, as QEMU boots from it)",
            "api": "`GET /images/:id` with the token"}
    return [(f"Range request of 256 KiB through {text}: req/s (wrk -c1)", fmt_spread(rg[way]),
             f"nginx static file, same Range: {fmt_spread(rg['nginx'])}",
             ratio(rg[way], rg["nginx"]), "—") for way, text in ways.items()]


# ---------------------------------------------------------------- /metrics


def seed_metrics_images(total):
    """Rows (no files) until the store holds total images, then the stored totals set from
    them as every start sets them (the rows are written behind image_stats' back)."""
    import image_stats
    from models import Image, User, db

    owner, _ = User.get_or_create(username="metrics", defaults={"email": "m@example.com"})
    start = Image.select().count()
    rows = [{"author": owner, "user": owner, "name": f"m{i}", "storage_key": f"metrics-{i}",
             "size": 200 * MiB, "virtual_size": 8 * GiB, "sha256": "0" * 64}
            for i in range(start, total)]
    with db.atomic():
        for batch in range(0, len(rows), 1000):
            Image.insert_many(rows[batch:batch + 1000]).execute()
    image_stats.recount()
    return image_stats.read()[0]


# One request of each kind a service in use answers, so that the scrape holds the series it
# would (a route, method and status each; a route and method's durations): (method, path,
# with the token).
SERIES_TRAFFIC = [
    ("GET", "/images", True), ("GET", "/images", False), ("GET", "/images?page=2", True),
    ("GET", "/images/999999999", True), ("HEAD", "/images/999999999", True),
    ("DELETE", "/images/999999999", True), ("POST", "/images?name=x", True),
    ("POST", "/images?name=x", False), ("PUT", "/images", True),
    ("POST", "/images/999999999/links", True), ("GET", "/links/forged/x.qcow2", False),
    ("GET", "/healthz", False), ("GET", "/openapi.json", False), ("GET", "/no/such", False),
]


def make_series(server, token):
    """Answers of many kinds, each a series of the scrape; returns how many requests."""
    for method, path, with_token in SERIES_TRAFFIC:
        auth = ["-H", f"Authorization: Bearer {token}"] if with_token else []
        body = ["--data-binary", "x"] if method == "POST" else []
        curl("-X", method, *auth, *body, f"{server.url}{path}",
             *(["-I"] if method == "HEAD" else []))
    return len(SERIES_TRAFFIC)


def app_seconds_per_scrape(url):
    """The app's own mean time per GET /metrics, from its request histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found = {(s.name, s.labels.get("route"), s.labels.get("method")): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    name = "imagestore_http_request_duration_seconds"
    return found[(f"{name}_sum", "/metrics", "GET")] / found[(f"{name}_count", "/metrics", "GET")]


def bench_metrics(cfg, server, token):
    """GET /metrics on a store of metrics_images images: its latency (wrk -c1, median)
    beside the trivial route's, taking turns, and the app's own time per scrape."""
    from app import create_app

    app = create_app(instance_path=str(server.instance))
    with app.app_context():
        stored = seed_metrics_images(cfg["metrics_images"])
    print(f"  {stored} images stored", flush=True)
    make_series(server, token)
    url, trivial = f"{server.url}/metrics", f"{server.url}/_bench/trivial"
    wrk(url, token, 1, 1)  # warm up: every worker's connection, the files read once
    with urllib.request.urlopen(url, timeout=30) as response:
        samples = sum(1 for line in response.read().decode().splitlines()
                      if not line.startswith("#"))
    runs = {"metrics": [], "trivial": []}
    order = [("metrics", url), ("trivial", trivial)]
    for rep in range(cfg["wrk_reps"]):
        for name, target in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(wrk(target, token, 1, cfg["wrk_seconds"])[1])
    return {"images": stored, "samples": samples, "latency": runs,
            "app_seconds": app_seconds_per_scrape(url)}


def metrics_rows(mt):
    latency = mt["latency"]
    return [(f"GET /metrics latency (wrk -c1, median), {mt['images']} images stored, "
             f"{mt['samples']} samples",
             fmt_ms(latency["metrics"]), f"trivial JSON route: {fmt_ms(latency['trivial'])}",
             f"{median_ratio(latency['metrics'], latency['trivial']):.2f}",
             f"< 5 ms: {verdict(statistics.median(latency['metrics']) < 0.005)}"),
            ("GET /metrics, the app's own time per scrape (its histogram's mean)",
             f"{mt['app_seconds'] * 1e3:.2f} ms", "—", "—", "—")]


# ---------------------------------------------------------------- report


def machine():
    """What the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    versions = {}
    for tool, cmd in (("nginx", ["nginx", "-v"]), ("docker-registry", ["docker-registry",
                      "--version"]), ("curl", ["curl", "--version"]), ("wrk", ["wrk", "-v"])):
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
        versions[tool] = " ".join((out.stdout + out.stderr).split()[:3])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(total / (1 << 20), 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "versions": versions}


def fmt_spread(values, scale=1.0, unit="", digits=0):
    """median [min-max] of some measurements, scaled and with a unit."""
    med, lo, hi = (v * scale for v in spread(values))
    return f"{med:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_rate(values):
    return fmt_spread(values, 1 / MiB, " MiB/s")


def fmt_ms(values):
    return fmt_spread(values, 1e3, " ms", 2)


def fmt_cpu(values):
    return fmt_spread(values, 1.0, " s", 2)


def fmt_faults(values):
    return fmt_spread(values, 1.0, "")


def pair_ratios(a, b):
    """a[i] / b[i] for each pair of runs taken next to each other (pairs with b[i] == 0, a
    transfer shorter than one CPU tick, left out)."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def ratio(a, b):
    """The ratio per pair of runs as median [min-max]; — when no pair has a ratio."""
    ratios = pair_ratios(a, b)
    return fmt_spread(ratios, 1.0, "", 2) if ratios else "—"


def median_ratio(a, b):
    """median(a) / median(b), for figures not measured in pairs; nan when b is 0."""
    below = statistics.median(b)
    return statistics.median(a) / below if below else float("nan")


def verdict(ok):
    return "PASS" if ok else "MISS"


def pair_goal(a, b, median_at_least, worst_at_least=None):
    """The goal on the per-pair ratios: median at least so much (and the worst pair)."""
    ratios = pair_ratios(a, b)
    ok = bool(ratios) and statistics.median(ratios) >= median_at_least
    text = f"median ≥ {median_at_least:.2f}"
    if worst_at_least is not None:
        ok = ok and min(ratios) >= worst_at_least
        text += f", worst ≥ {worst_at_least:.2f}"
    return f"{text}: {verdict(ok)}"


TRANSFER_WAYS = {  # way: (imagestore's request, nginx's, the registry's)
    "upload": ("`POST /images`", "nginx `PUT` (dav)", "registry blob upload"),
    "download": ("`GET /images/:id`", "nginx static `GET`", "registry blob `GET`"),
}
FIRST_DOWNLOAD = "download right after the upload, the file as the upload left it"
FREE_DOWNLOAD = "download, curl and the server where the scheduler puts them"


def transfer_way_rows(tr, way, size):
    """Rows of one way (upload or download) for the largest file: rates against nginx and
    the registry, server CPU and minor page faults per GiB."""
    mine, ngx, reg = (tr["servers"][n][-1] for n in SERVERS)
    verb, to_nginx, to_registry = TRANSFER_WAYS[way]
    rows = [(f"{way} {size}, {verb}", fmt_rate(mine[way]), f"{to_nginx}: {fmt_rate(ngx[way])}",
             ratio(mine[way], ngx[way]), pair_goal(mine[way], ngx[way], 1.0, 0.9)),
            (f"{way} {size}, {verb}", fmt_rate(mine[way]),
             f"{to_registry}: {fmt_rate(reg[way])}", ratio(mine[way], reg[way]),
             pair_goal(mine[way], reg[way], 1.0) if way == "upload" else "—")]
    cpu, faults = f"{way}_cpu", f"{way}_faults"
    rows.append((f"server CPU per GiB, {way}", fmt_cpu(mine[cpu]),
                 f"nginx: {fmt_cpu(ngx[cpu])}; registry: {fmt_cpu(reg[cpu])}",
                 ratio(mine[cpu], ngx[cpu]), "—"))
    rows.append((f"worker minor page faults per GiB, {way}", fmt_faults(mine[faults]),
                 f"nginx: {fmt_faults(ngx[faults])}", "—", "—"))
    return rows


def transfer_rows(tr):
    """Rows for the largest file: rates, server CPU, page faults, memory, the disk's limit."""
    size = human_size(cfg_size(tr["sizes"][-1]))
    mine = tr["servers"]["imagestore"][-1]
    rows = transfer_way_rows(tr, "upload", size)
    disk = tr["disk_fsync"][-1]
    rows.append((f"upload {size}: the disk's limit", fmt_rate(mine["upload"]),
                 f"write + fsync of a file: {fmt_rate(disk)}",
                 f"{median_ratio(mine['upload'], disk):.2f}", "—"))
    rows += transfer_way_rows(tr, "download", size)
    ngx = tr["servers"]["nginx"][-1]
    rows.append((f"{FIRST_DOWNLOAD} {size}", fmt_rate(mine["first_download"]),
                 f"nginx: {fmt_rate(ngx['first_download'])}",
                 ratio(mine["first_download"], ngx["first_download"]), "—"))
    rows.append((f"{FREE_DOWNLOAD} {size}", fmt_rate(mine["free_download"]),
                 f"nginx: {fmt_rate(ngx['free_download'])}",
                 ratio(mine["free_download"], ngx["free_download"]), "—"))
    for way in ("upload", "download"):
        growth = mine[f"{way}_memory"]
        rows.append((f"worker peak RSS growth, {way} {size}",
                     fmt_spread(growth, 1 / MiB, " MiB", 1), "—", "—",
                     f"worst < 32 MiB: {verdict(max(growth) < 32 * MiB)}"))
    return rows


def refusal_rows(rf, sizes):
    """Time to the answer and bytes taken, the large hostile body against the small one."""
    large, small = (human_size(n) for n in sizes)
    big, little = rf["large"], rf["small"]
    kinds = " or ".join(dict.fromkeys(rf["kinds"]))
    statuses = ", ".join(sorted({str(r["status"]) for r in big + little}))
    secs = [[r["seconds"] for r in runs] for runs in (big, little)]
    rows = [(f"refusal of a hostile {large} body ({kinds}, in turns): time to the answer "
             f"(HTTP {statuses})", fmt_ms(secs[0]), f"{small} body: {fmt_ms(secs[1])}",
             ratio(*secs), refusal_time_goal(*secs))]
    for who, key in (("bytes the server took (TCP acked)", "server_took"),
                     ("bytes the client sent", "client_sent")):
        values = [[r[key] for r in runs] for runs in (big, little)]
        goal = (f"worst ≤ 64 MiB: {verdict(max(values[0]) <= 64 * MiB)}"
                if key == "server_took" else "—")
        rows.append((f"refusal of a hostile {large} body: {who}",
                     fmt_spread(values[0], 1 / MiB, " MiB", 1),
                     f"{small} body: {fmt_spread(values[1], 1 / MiB, ' MiB', 1)}", "—", goal))
    return rows


def refusal_time_goal(large, small):
    """The large body is answered in about the time of the small one: median ratio ≤ 1.5."""
    ratios = pair_ratios(large, small)
    return f"median ≤ 1.50: {verdict(bool(ratios) and statistics.median(ratios) <= 1.5)}"


def inspection_rows(ins):
    labels = list(ins)
    small, big, data = (ins[label] for label in labels)
    r = median_ratio(big, small)
    return [("inspection (`inspect_qcow2`), 16 GiB virtual", fmt_ms(big),
             f"16 MiB virtual: {fmt_ms(small)}", f"{r:.2f}", f"≈ 1 (≤ 1.5): {verdict(r <= 1.5)}"),
            (f"inspection, {labels[2]}", fmt_ms(data), f"16 MiB virtual: {fmt_ms(small)}",
             f"{median_ratio(data, small):.2f}", "—")]


def list_rows(ls):
    small, big = ls["rps"]
    rows = []
    for n in (small, big):
        runs = ls["rps"][n]
        rows.append((f"list page 1, bench sees {n} images: req/s (wrk -c8)",
                     fmt_spread(runs["list"]),
                     f"trivial JSON route: {fmt_spread(runs['trivial'])}",
                     ratio(runs["list"], runs["trivial"]),
                     pair_goal(runs["list"], runs["trivial"], 0.4)))
    for page in ("1", "40"):
        s = ls["sql"][big][page]
        rows.append((f"SQL queries per list request, page {page}", f"{s['queries']} queries "
                     f"(+ {s['pragmas']} PRAGMAs when the pool opens a connection, "
                     "none on a pooled one)",
                     "—", "—", f"≤ 3: {verdict(s['queries'] <= 3)}"))
    lat = ls["latency"]
    for page in ("1", "40"):
        a, b = lat[f"bench/{small}/{page}"], lat[f"bench/{big}/{page}"]
        r = median_ratio(b, a)
        rows.append((f"list page {page} latency (wrk -c1, median), bench sees {big}",
                     fmt_ms(b), f"bench sees {small}: {fmt_ms(a)}", f"{r:.2f}",
                     f"≤ 1.5: {verdict(r <= 1.5)}" if page == "1" else "—"))
    for page in ("1", "40"):
        a, b = lat[f"bench/{small}/{page}"], lat[f"few/{big}/{page}"]
        rows.append((f"list page {page} latency, `few` sees {int(big) // 100} of the "
                     f"{int(big) * 111 // 100} images", fmt_ms(b),
                     f"bench sees {small}: {fmt_ms(a)}", f"{median_ratio(b, a):.2f}", "—"))
    return rows


def table(results):
    """The markdown table of figures, references, ratios and goals."""
    rows = []
    if "transfers" in results:
        rows += transfer_rows(results["transfers"])
    if "refusal" in results:
        rows += refusal_rows(results["refusal"], results["settings"]["refusal_sizes"])
    if "resumable" in results:
        rows += resumable_rows(results["resumable"])
    if "inspection" in results:
        rows += inspection_rows(results["inspection"])
    if "list" in results:
        rows += list_rows(results["list"])
    if "import" in results:
        rows += import_rows(results["import"])
    if "ranges" in results:
        rows += range_rows(results["ranges"])
    if "metrics" in results:
        rows += metrics_rows(results["metrics"])
    head = "| figure | imagestore | reference | ratio | goal |\n| --- | --- | --- | --- | --- |\n"
    goals = [row[-1] for row in rows]
    tally = (f"\nGoals: {sum(g.endswith('PASS') for g in goals)} PASS, "
             f"{sum(g.endswith('MISS') for g in goals)} MISS\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n" + tally


def throughput_table(tr):
    """Median MiB/s of each server at each size."""
    lines = ["| file size | " + " | ".join(f"{n} up" for n in SERVERS) + " | "
             + " | ".join(f"{n} down" for n in SERVERS) + " |",
             "| --- " * (1 + 2 * len(SERVERS)) + "|"]
    for i, size in enumerate(tr["sizes"]):
        cells = [f"{statistics.median(tr['servers'][n][i][way]) / MiB:.0f}"
                 for way in ("upload", "download") for n in SERVERS]
        lines.append(f"| {human_size(cfg_size(size))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(tr, path):
    """Throughput against file size, upload and download, for the three servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [s / MiB for s in tr["sizes"]]
    for ax, way in zip(axes, ("upload", "download"), strict=True):
        for name, marker in zip(SERVERS, "osd", strict=True):
            runs = [by_size[way] for by_size in tr["servers"][name]]
            med = [statistics.median(r) / MiB for r in runs]
            low = [m - min(r) / MiB for m, r in zip(med, runs, strict=True)]
            high = [max(r) / MiB - m for m, r in zip(med, runs, strict=True)]
            ax.errorbar(sizes, med, yerr=[low, high], marker=marker, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [human_size(cfg_size(int(s * MiB))) for s in sizes])
        ax.set_title(f"{way} (curl, loopback; median, min-max)")
        ax.set_xlabel("file size")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("MiB/s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results, command):
    """The markdown that docs/benchmarks.md records."""
    m = results["machine"]
    parts = [f"Command: `{command}`  \n",
             f"Run: {results['started']}, {results['seconds']:.0f} s; load average before "
             f"{results['loadavg_before']}, after {results['loadavg_after']}  \n",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
             f"{m['kernel']}, Python {m['python']}  \n",
             "Tools: " + "; ".join(m["versions"].values()) + "\n\n", table(results)]
    if "transfers" in results:
        parts += ["\nThroughput in MiB/s (median) by file size:\n\n",
                  throughput_table(results["transfers"])]
    return "".join(parts)


# ---------------------------------------------------------------- main


PARTS = ("transfers", "refusal", "resumable", "inspection", "list", "import", "ranges",
         "metrics")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes, 1 repetition, 256 MiB hostile body")
    parser.add_argument("--reps", type=int, help="repetitions of each figure (default 5)")
    parser.add_argument("--sizes", help="file sizes to transfer, e.g. 64M,1G (the last one is "
                        "the size of the table's figures)")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write the chart to " + str(DOCS_CHART.relative_to(ROOT)))
    return parser.parse_args()


def loadavg():
    """The machine's load average over 1, 5 and 15 minutes."""
    return [f"{load:.2f}" for load in os.getloadavg()]


def run_parts(cfg, parts, results):
    """Start the servers and run the parts asked for; everything is stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="imagestore-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        print(f"starting imagestore, nginx and docker-registry on 127.0.0.1 (files in {work})",
              flush=True)
        store = start_imagestore(work, stack)
        token = store.token("bench")
        nginx = (start_nginx(work, stack) if {"transfers", "import", "ranges"} & set(parts)
                 else None)
        if "transfers" in parts:
            registry = start_registry(work, stack)
            clients = [Imagestore(store, token, work), Nginx(nginx), Registry(registry, work)]
            print("transfers (upload and download, MiB/s)", flush=True)
            results["transfers"] = bench_transfers(cfg, work, clients)
        if "refusal" in parts:
            print("early refusal of hostile uploads", flush=True)
            results["refusal"] = bench_refusal(cfg, work, store, token)
        if "resumable" in parts:
            print("resumable upload (tus) against POST /images", flush=True)
            results["resumable"] = bench_resumable(cfg, work, store, token)
        if "inspection" in parts:
            print("inspection", flush=True)
            results["inspection"] = bench_inspection(cfg, work)
        if "list" in parts:
            print("list page", flush=True)
            results["list"] = bench_list(cfg, store, token)
        if "import" in parts:
            print("import from a URL (nginx on loopback) against curl -o", flush=True)
            results["import"] = bench_import(cfg, work, store, token, nginx)
        if "ranges" in parts:
            print("Range requests of 256 KiB (req/s)", flush=True)
            results["ranges"] = bench_ranges(cfg, work, store, token, nginx)
        if "metrics" in parts:
            print("/metrics", flush=True)
            results["metrics"] = bench_metrics(cfg, store, token)


def write_outputs(results, record):
    """results.json, report.md and the chart in bench/out (and the chart in docs/ when
    recording); print the report."""
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results, results["command"])
    (OUT / "report.md").write_text(text)
    if "transfers" in results:
        chart(results["transfers"], OUT / "throughput.png")
        if record:
            shutil.copyfile(OUT / "throughput.png", DOCS_CHART)
    print()
    print(text)
    print(f"written: {OUT.relative_to(ROOT)}/results.json, report.md"
          + (", throughput.png" if "transfers" in results else "")
          + (f"; {DOCS_CHART.relative_to(ROOT)}" if record and "transfers" in results else ""))


def main():
    args = parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run bench/run, which installs them")
    cfg = settings(args)
    if args.sizes:
        from config import parse_size

        cfg["sizes"] = [parse_size(size) for size in args.sizes.split(",")]
    for name in ("DATABASE_URL", "STORAGE_URL", "PUBLIC_URL", "SECRET_KEY"):
        os.environ.pop(name, None)  # the benchmark's own instance, never a configured one
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"command": "bench/run" + "".join(f" {a}" for a in sys.argv[1:]),
               "started": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
               "loadavg_before": loadavg(), "machine": machine(), "settings": cfg}
    began = time.monotonic()
    run_parts(cfg, args.only or PARTS, results)
    results["seconds"] = time.monotonic() - began
    results["loadavg_after"] = loadavg()
    write_outputs(results, args.record)


if __name__ == "__main__":
    main()
