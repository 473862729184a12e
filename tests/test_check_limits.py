"""What one upload's qemu-img may cost: a CPU budget that grows with the file, and a bound
on how many checks run at once on the machine, shared by every process through lock files.

Each test has a slot folder of its own, so that tests running at the same time on this machine
do not share slots.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sample_images
from conftest import ROOT, files_under, start_server, stop_server

import qcow2

LIMIT = 2 << 40
GIB = 1 << 30
# The most CPU per GiB that `qemu-img check` needed on an honest image (512-byte clusters,
# the smallest, 1 GiB of data written by qemu-io; docs/security.md): 1.6 s.
HONEST_WORST_CPU_PER_GIB = 1.6
GUARD_SECONDS = 120  # only against hanging for ever; nothing here waits this long when it works


# --- the budget ------------------------------------------------------------------------

def test_budget_grows_with_the_file_size():
    """More file, more CPU (and wall clock) for qemu-img; a tiny file gets the base."""
    sizes = [0, 1 << 20, GIB - 1, GIB, 2 * GIB, 8 * GIB, 20 * GIB, 1 << 40]
    budgets = [qcow2.check_budget(size) for size in sizes]
    assert budgets[0].cpu_seconds == budgets[1].cpu_seconds == qcow2.CPU_BASE_SECONDS
    cpu = [budget.cpu_seconds for budget in budgets]
    assert cpu == sorted(cpu) and cpu[3] < cpu[4] < cpu[5] < cpu[6] < cpu[7]
    assert qcow2.check_budget(8 * GIB).cpu_seconds == (
        qcow2.CPU_BASE_SECONDS + 8 * qcow2.CPU_SECONDS_PER_GIB)
    for budget in budgets:
        assert budget.wall_seconds >= max(budget.cpu_seconds, qcow2.TIMEOUT_SECONDS)


@pytest.mark.parametrize("gib", [1, 2, 8, 20, 100])
def test_budget_covers_honest_images(gib):
    """An honest image of any size gets more CPU than the slowest one measured needed."""
    assert qcow2.check_budget(gib * GIB).cpu_seconds > HONEST_WORST_CPU_PER_GIB * gib


@pytest.mark.slow  # a second of CPU, by design
def test_crafted_image_is_refused_at_its_budget(tmp_path, monkeypatch):
    """A 448 KiB file whose check costs seconds of CPU is stopped at its budget."""
    monkeypatch.setattr(qcow2, "CPU_BASE_SECONDS", 1)
    with pytest.raises(qcow2.ImageRefused) as caught:
        qcow2.inspect_qcow2(str(sample_images.costly_check(tmp_path)), LIMIT)
    assert str(caught.value).startswith(
        "File not a valid QCOW2 image: checking it needs more CPU time than the 1 s allowed "
        "for a file of its size (1 s plus 3 s per GiB)")


def test_honest_image_passes_on_the_smallest_budget(tmp_path, monkeypatch):
    """The same base budget lets an honest image with data through."""
    monkeypatch.setattr(qcow2, "CPU_BASE_SECONDS", 1)
    image = sample_images.with_data(tmp_path)
    assert qcow2.inspect_qcow2(str(image), LIMIT).virtual_size == 1 << 20


@pytest.mark.slow  # a second of CPU, by design
def test_crafted_upload_is_a_400_naming_the_budget(app, client, alice, tmp_path, monkeypatch):
    """Through the API: {"file": ["..."]} and nothing kept."""
    monkeypatch.setattr(qcow2, "CPU_BASE_SECONDS", 1)
    data = sample_images.costly_check(tmp_path).read_bytes()
    response = client.post("/images", query_string={"name": "costly"}, headers=alice.headers,
                           data=data)
    assert response.status_code == 400
    (message,) = response.get_json()["file"]
    assert "needs more CPU time than the 1 s allowed for a file of its size" in message
    assert files_under(app.extensions["storage"].root) == []


# --- the slots, across processes -------------------------------------------------------

# A process that checks one image with one slot in a given folder and logs when each qemu-img
# run starts and ends: "<pid> enter|exit <CLOCK_MONOTONIC>", one write each, to the log file.
# It starts when its standard input closes, so that the test can start several at one moment.
CHECKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import qcow2

    image, log, budget, slots = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    qcow2.CPU_BASE_SECONDS = budget
    real = qcow2._run_qemu_img

    def note(event):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{os.getpid()} {event} {time.monotonic()}\\n".encode())
        os.close(fd)

    def logged(*args, **options):
        note("enter")
        try:
            return real(*args, **options)
        finally:
            note("exit")

    qcow2._run_qemu_img = logged
    sys.stdin.read()
    try:
        qcow2.inspect_qcow2(image, 2 << 40, (slots, 1))
    except qcow2.ImageRefused as refusal:
        print(refusal)
""")


def start_checker(image: Path, slots: Path, budget: int, qemu_img: Path | None = None):
    """A CHECKER process, waiting for its standard input to close; it logs to slots/runs.log."""
    env = {**os.environ, "PATH": f"{qemu_img.parent}:{os.environ['PATH']}"} if qemu_img else None
    return subprocess.Popen([sys.executable, "-c", CHECKER, str(ROOT), str(image),
                             str(slots.parent / "runs.log"), str(budget), str(slots)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def intervals(log: Path) -> list[tuple[float, float, str]]:
    """(start, end, pid) of every qemu-img run in a CHECKER log."""
    open_runs, found = {}, []
    for line in log.read_text().splitlines():
        pid, event, when = line.split()
        if event == "enter":
            open_runs[pid] = float(when)
        else:
            found.append((open_runs.pop(pid), float(when), pid))
    assert not open_runs
    return sorted(found)


@pytest.mark.slow  # two seconds of CPU, by design
def test_one_slot_lets_one_process_check_at_a_time(tmp_path):
    """Two processes that start checking at the same moment take turns: no overlap."""
    image, slots = sample_images.costly_check(tmp_path), tmp_path / "slots"
    checkers = [start_checker(image, slots, budget=1) for _ in range(2)]
    for checker in checkers:  # both start now
        checker.stdin.close()
    for checker in checkers:
        checker.wait(timeout=GUARD_SECONDS)
    outputs = []
    for checker in checkers:
        with checker.stdout:
            outputs.append(checker.stdout.read())  # one line
    assert all("needs more CPU time than the 1 s allowed" in out for out in outputs), outputs
    runs = intervals(tmp_path / "runs.log")
    assert len(runs) == 4 and len({pid for _, _, pid in runs}) == 2  # info and check, each
    for (_, end, _), (start, _, _) in itertools.pairwise(runs):
        assert end <= start, runs


def lock_held(path: Path) -> bool:
    """Whether somebody holds the lock file at path (asked without waiting, let go at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def pid_reporting_qemu_img(tmp_path: Path) -> tuple[Path, Path]:
    """A `qemu-img` to put first on PATH: it writes its pid into a FIFO, then execs the real
    one (same process, same pid)."""
    fifo, shim = tmp_path / "qemu-img.pid", tmp_path / "bin" / "qemu-img"
    os.mkfifo(fifo)
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\necho $$ > {fifo}\nexec {shutil.which('qemu-img')} \"$@\"\n")
    shim.chmod(0o755)
    return shim, fifo


def read_fifo(fifo: Path) -> str:
    """What the next writer writes into fifo; fails (rather than hangs) if nobody does."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    reader.join(GUARD_SECONDS)
    if not got:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the reader go
        raise AssertionError("no qemu-img started")
    return got[0]


def wait_for_exit(pid: int) -> bool:
    """Whether the process pid (not our child) ends within the guard time."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], GUARD_SECONDS)[0])
    finally:
        os.close(pidfd)


def test_a_killed_holder_frees_its_slot_and_its_qemu_img(tmp_path):
    """SIGKILL to a process in the middle of a check: the slot is free once it is gone, and
    its qemu-img dies with it rather than run on outside the bound."""
    image, slots = sample_images.costly_check(tmp_path, 20000), tmp_path / "slots"  # minutes of CPU
    shim, fifo = pid_reporting_qemu_img(tmp_path)
    holder = start_checker(image, slots, budget=600, qemu_img=shim)
    holder.stdin.close()
    qemu_img = 0
    try:
        read_fifo(fifo)  # info
        qemu_img = int(read_fifo(fifo))  # check, the costly run
        assert lock_held(slots / "slot-0")
        holder.kill()
        holder.wait(timeout=GUARD_SECONDS)
        assert not lock_held(slots / "slot-0")
        assert wait_for_exit(qemu_img), "qemu-img outlived the process that started it"
    finally:
        holder.kill()
        holder.wait(timeout=GUARD_SECONDS)
        holder.stdout.close()
        if qemu_img:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu_img, signal.SIGKILL)


# --- the slots, in the service ---------------------------------------------------------

@pytest.fixture
def server(tmp_path_factory):
    """gunicorn (two workers) with one check slot and a body timeout of 1 second."""
    server = start_server(tmp_path_factory.mktemp("slots"),
                          {"QEMU_IMG_SLOTS": "1", "BODY_READ_TIMEOUT": "1"})
    server.headers = server.account("sender")
    server.slots = server.instance / "qemu-img-slots"
    yield server
    stop_server(server)


@contextlib.contextmanager
def holding_the_slot(folder: Path):
    """Hold slot 0 of folder, as a long check elsewhere on the machine would."""
    folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(folder / "slot-0", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_until_queued(slots: Path) -> None:
    """Wait until an upload waits in line for a slot: a server process holds the gate."""
    deadline = time.monotonic() + GUARD_SECONDS
    while not lock_held(slots / "queue"):
        assert time.monotonic() < deadline, "no upload is waiting for a check slot"
        time.sleep(0.05)


def upload_in_background(server, name: str, data: bytes) -> dict:
    """POST the image on a thread of its own; the dict gets status and body once answered."""
    answer: dict = {}

    def post():
        request = urllib.request.Request(f"{server.url}/images?name={name}", data=data,
                                         headers=server.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=GUARD_SECONDS) as response:
                answer.update(status=response.status, body=json.load(response))
        except urllib.error.HTTPError as error:
            answer.update(status=error.code, body=json.load(error))

    answer["thread"] = threading.Thread(target=post, daemon=True)
    answer["thread"].start()
    return answer


def answered(answer: dict) -> dict:
    """The answer of upload_in_background, once it has come."""
    answer["thread"].join(GUARD_SECONDS)
    assert "status" in answer, "the upload was not answered"
    return answer


def test_a_queued_upload_waits_past_the_body_timeout_and_is_stored(server, qcow2_bytes):
    """With the only slot taken, an upload waits for it, however long, and then answers 201:
    its body has arrived, so the body timeout (1 s here) does not cut it off."""
    with holding_the_slot(server.slots):
        answer = upload_in_background(server, "queued", qcow2_bytes)
        wait_until_queued(server.slots)
        # Time itself is what is tested: the body watch would cut a body stalled this long.
        time.sleep(2.5)
        assert "status" not in answer
    assert answered(answer)["status"] == 201, answer
    assert answer["body"]["name"] == "queued"


def send_and_leave(server, name: str, data: bytes) -> None:
    """Send a whole upload, then close the connection without waiting for the answer."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_SECONDS) as sock:
        sock.sendall(f"POST /images?name={name} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {server.headers['Authorization']}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def test_a_waiting_upload_whose_client_left_frees_everything(server, qcow2_bytes):
    """A client that leaves while its upload waits for the slot holds nothing for good: the
    next upload gets the slot, no lock stays held, no staged file stays behind."""
    with holding_the_slot(server.slots):
        send_and_leave(server, "left", qcow2_bytes)
        wait_until_queued(server.slots)
        answer = upload_in_background(server, "next", qcow2_bytes)
    assert answered(answer)["status"] == 201, answer
    # The slot is free again (the upload that left had it before this one), and the gate.
    assert not lock_held(server.slots / "slot-0") and not lock_held(server.slots / "queue")
    stop_server(server)  # lets every request finish: the one that left, too
    assert files_under(server.instance / "images" / ".incoming") == []
