"""Background jobs (jobs.py): a job is queued with the change it belongs to, run once by
whichever thread or process claims it, tried again after each wait, kept when it failed
for good, and taken over when the worker holding it dies.

Every test runs on SQLite, and on PostgreSQL too when TEST_DATABASE_URL is set.
"""

import collections
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from conftest import ROOT

import jobs
from config import load_config
from models import Job, db, utcnow, write_transaction

DEADLINE = 60  # seconds: generous, for a busy machine


@pytest.fixture
def kinds():
    """The registry of job kinds, as it was before the test once it is over."""
    saved = dict(jobs.KINDS)
    yield jobs.KINDS
    jobs.KINDS.clear()
    jobs.KINDS.update(saved)


class Recorder:
    """A handler that records each payload it is given, and can fail its first tries."""

    def __init__(self, failures=0):
        self.payloads = []
        self.failures = failures
        self.lock = threading.Lock()
        self.ran = threading.Condition(self.lock)

    def __call__(self, payload):
        with self.ran:
            self.payloads.append(payload)
            self.ran.notify_all()
            if len(self.payloads) <= self.failures:
                raise RuntimeError(f"try {len(self.payloads)} failed")

    def wait_for(self, count):
        """Wait until the handler has run count times."""
        with self.ran:
            assert self.ran.wait_for(lambda: len(self.payloads) >= count, DEADLINE), \
                f"ran {len(self.payloads)} times, not {count}"


def enqueue(kind, payload, **options):
    """Queue a job in a transaction of its own, as a change would."""
    with write_transaction():
        return jobs.enqueue(kind, payload, **options)


def test_a_job_commits_or_rolls_back_with_the_change(app, kinds):
    jobs.register("note", Recorder())
    enqueue("note", {"n": 1})
    with pytest.raises(RuntimeError), write_transaction():
        jobs.enqueue("note", {"n": 2})
        raise RuntimeError("the change failed")
    assert [j.payload for j in Job.select()] == ['{"n": 1}']


def test_a_due_job_runs_once_with_its_payload_and_is_gone(app, kinds):
    handler = Recorder()
    jobs.register("note", handler)
    enqueue("note", {"image": 7, "action": "created"})
    enqueue("note", {"image": 8, "action": "deleted"})
    assert jobs.run_due_jobs() == 2
    assert handler.payloads == [{"image": 7, "action": "created"},
                                {"image": 8, "action": "deleted"}]
    assert Job.select().count() == 0
    assert jobs.run_due_jobs() == 0


def test_a_job_for_later_waits_for_its_time(app, kinds):
    handler = Recorder()
    jobs.register("note", handler)
    enqueue("note", {}, run_at=utcnow() + timedelta(hours=1))
    assert jobs.run_due_jobs() == 0
    assert handler.payloads == []
    assert Job.get().state == "pending"


def test_a_kind_without_a_handler_is_refused(app, kinds):
    with pytest.raises(ValueError, match="no handler registered for jobs of kind 'nothing'"):
        enqueue("nothing", {})


def test_a_failed_try_waits_its_backoff_before_the_next(app, kinds):
    handler = Recorder(failures=1)
    jobs.register("note", handler, backoff=(3600,), max_attempts=3)
    enqueue("note", {})
    assert jobs.run_due_jobs() == 1
    job = Job.get()
    assert (job.state, job.attempts, job.last_error) == ("pending", 1, "try 1 failed")
    assert jobs.run_due_jobs() == 0  # not before its wait is over
    assert len(handler.payloads) == 1


def test_after_its_last_try_a_job_is_kept_as_failed(app, kinds):
    told = []
    handler = Recorder(failures=10)
    jobs.register("note", handler, backoff=(0, 0), max_attempts=3,
                  on_failure=lambda payload, error: told.append((payload, error)))
    enqueue("note", {"image": 3})
    assert jobs.run_due_jobs() == 3
    job = Job.get()
    assert (job.state, job.attempts, job.last_error) == ("failed", 3, "try 3 failed")
    assert told == [({"image": 3}, "try 3 failed")]
    assert jobs.run_due_jobs() == 0
    assert len(handler.payloads) == 3


def test_a_failed_job_is_kept_for_job_history_then_removed(app, kinds):
    jobs.register("note", Recorder(failures=10), backoff=(), max_attempts=1)
    month = 31 * 86400  # past the default JOB_HISTORY of 30 days
    old = Job.create(kind="note", payload="{}", state="failed", run_at=jobs.database_now() - month)
    waiting = Job.create(kind="note", payload="{}", run_at=jobs.database_now() + month)
    enqueue("note", {"fails": "now"})
    assert jobs.run_due_jobs() == 1  # its failure for good removes what is past JOB_HISTORY
    assert Job.get_or_none(Job.id == old.id) is None
    assert sorted((j.state, j.payload) for j in Job.select()) == [
        ("failed", '{"fails": "now"}'), ("pending", "{}")]
    assert Job.get_by_id(waiting.id).state == "pending"
    assert jobs.prune_failed() == 0


def test_a_job_whose_last_try_never_finished_is_failed_not_run_again(app, kinds):
    """The worker running its last try died (its claim lapsed): what kills a worker every
    time it runs must not be run for ever."""
    handler = Recorder()
    jobs.register("note", handler, max_attempts=2)
    job_id = enqueue("note", {})
    Job.update(attempts=2, claimed_by="elsewhere:1234:dead", claimed_until=0).where(
        Job.id == job_id).execute()
    assert jobs.run_due_jobs() == 1
    job = Job.get()
    assert (job.state, job.last_error) == ("failed", "try 2 did not finish (its worker stopped)")
    assert handler.payloads == []


def test_an_interrupted_job_runs_again_without_counting_the_try(app, kinds):
    tries = []

    def handler(payload):
        tries.append(payload)
        if len(tries) == 1:
            raise jobs.Interrupted()

    jobs.register("note", handler, max_attempts=1)
    enqueue("note", {})
    assert jobs.run_due_jobs() == 2
    assert len(tries) == 2
    assert Job.select().count() == 0


def test_threads_run_a_job_at_once_when_this_process_queued_it(make_app, kinds, job_threads):
    """The poll interval is an hour: only the wake-up after the commit can start it."""
    app = make_app(JOB_POLL_INTERVAL=3600.0)
    handler = Recorder()
    jobs.register("note", handler)
    job_threads(app)
    enqueue("note", {"n": 1})
    handler.wait_for(1)
    assert handler.payloads == [{"n": 1}]


def test_threads_run_the_next_try_when_its_wait_is_over(make_app, kinds, job_threads):
    app = make_app(JOB_POLL_INTERVAL=3600.0)
    handler = Recorder(failures=1)
    jobs.register("note", handler, backoff=(0.2,))
    job_threads(app)
    enqueue("note", {})
    handler.wait_for(2)


def test_many_threads_claim_each_job_once(app, kinds):
    handler = Recorder()
    jobs.register("note", handler)
    with write_transaction():
        for n in range(200):
            jobs.enqueue("note", {"n": n})
    start = threading.Barrier(8)

    def work():
        start.wait(DEADLINE)
        with db.connection_context():
            jobs.run_due_jobs()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    runs = collections.Counter(p["n"] for p in handler.payloads)
    assert sorted(runs) == list(range(200))
    assert set(runs.values()) == {1}
    assert Job.select().count() == 0


# A job process of its own: registers the kind, and on "go" (stdin) runs due jobs with four
# threads; each run is written to the file as "n pid". kind "block" prints "started" and
# blocks, to be killed. Its lease is long but for the test of a killed claim: under load,
# threads waiting their turn for SQLite's write lock could let a short one lapse.
WORKER = """
import os, sys, threading
sys.path.insert(0, sys.argv[1])
import jobs
from models import db, open_database
open_database(sys.argv[2])
jobs.configure({"JOB_LEASE": float(sys.argv[4])})
out = open(sys.argv[3], "a")
def record(payload):
    out.write(f"{payload['n']} {os.getpid()}\\n")
    out.flush()
def block(payload):
    print("started", flush=True)
    sys.stdin.read()
jobs.register("note", record)
jobs.register("block", block)
sys.stdin.readline()
def work():
    with db.connection_context():
        jobs.run_due_jobs()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"""


def job_process(database_url, out, lease=30.0):
    """A separate process that runs jobs of this database once told to (see WORKER), its
    claims held for lease seconds without a heartbeat."""
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(ROOT), database_url, str(out), str(lease)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.slow  # two Python processes, started for the test
def test_two_processes_claim_each_job_once(app, kinds, tmp_path):
    jobs.register("note", Recorder())
    with write_transaction():
        for n in range(300):
            jobs.enqueue("note", {"n": n})
    db.close()
    out = tmp_path / "runs"
    processes = [job_process(app.config["DATABASE_URL"], out) for _ in range(2)]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        process.stdin.close()
        assert process.wait(DEADLINE) == 0
    runs = collections.Counter(line.split()[0] for line in out.read_text().splitlines())
    assert sorted(map(int, runs)) == list(range(300))
    assert set(runs.values()) == {1}
    assert Job.select().count() == 0


def read_line(process):
    """The next line the process prints, waited for with a deadline."""
    ready, _, _ = select.select([process.stdout], [], [], DEADLINE)
    assert ready, "the job process said nothing"
    return process.stdout.readline().strip()


@pytest.mark.slow  # a process, and its lease of a second, by design
def test_the_claim_of_a_killed_process_is_taken_over(make_app, kinds, job_threads, tmp_path,
                                                     caplog):
    app = make_app(JOB_LEASE=1.0, JOB_POLL_INTERVAL=3600.0)
    handler = Recorder()
    jobs.register("block", handler)
    job_id = enqueue("block", {"image": 5})
    db.close()
    holder = job_process(app.config["DATABASE_URL"], tmp_path / "runs", lease=1.0)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert read_line(holder) == "started"
    assert f":{holder.pid}:" in Job.get().claimed_by
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(DEADLINE)

    job_threads(app)  # they wake when the dead process's claim lapses
    handler.wait_for(1)
    jobs.stop_job_threads(timeout=DEADLINE)
    assert handler.payloads == [{"image": 5}]
    assert Job.select().count() == 0
    assert f"job {job_id} (block): the claim of" in caplog.text


@pytest.mark.slow  # two leases of two seconds by design
def test_a_long_job_keeps_its_claim_past_the_lease(make_app, kinds):
    """The heartbeat renews the claim while the handler runs: nobody else takes it."""
    make_app(JOB_LEASE=2.0)
    started, release, runs = threading.Event(), threading.Event(), []

    def long_job(payload):
        runs.append(payload)
        started.set()
        assert release.wait(DEADLINE)

    jobs.register("long", long_job)
    enqueue("long", {})
    runner = threading.Thread(target=db.connection_context()(jobs.run_due_jobs))
    runner.start()
    assert started.wait(DEADLINE)
    first_lease = Job.get().claimed_until
    while jobs.database_now() < first_lease + 2.0:  # until two leases are over
        assert jobs.run_due_jobs() == 0  # would take the job over, had its claim lapsed
        time.sleep(0.05)
    release.set()
    runner.join(DEADLINE)
    assert len(runs) == 1
    assert Job.select().count() == 0


def test_stopping_lets_a_handler_hand_its_job_back(make_app, kinds, job_threads):
    app = make_app()
    started = threading.Event()

    def patient(payload):
        started.set()
        while not jobs.stopping():
            time.sleep(0.01)  # a handler at work, checking between pieces of it
        raise jobs.Interrupted()

    jobs.register("patient", patient)
    job_threads(app)
    enqueue("patient", {})
    assert started.wait(DEADLINE)
    jobs.stop_job_threads(timeout=DEADLINE)
    assert not any(t.name.startswith("jobs-") for t in threading.enumerate())
    job = Job.get()
    assert (job.state, job.attempts, job.claimed_by) == ("pending", 0, None)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("JOB_THREADS", "-1", "JOB_THREADS must be a whole number of 0 or more, not '-1'"),
    ("JOB_LEASE", "0", "JOB_LEASE must be a number of seconds above 0, not '0'"),
    ("JOB_POLL_INTERVAL", "soon", "JOB_POLL_INTERVAL must be a number of seconds above 0"),
    ("WEBHOOK_BACKOFF", "30,,60", "WEBHOOK_BACKOFF must be seconds separated by commas"),
    ("WEBHOOK_BACKOFF", "30,-1", "WEBHOOK_BACKOFF must be seconds separated by commas"),
    ("JOB_HISTORY", "forever", "JOB_HISTORY: not a duration: 'forever'"),
])
def test_a_bad_job_setting_is_refused_by_name(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(tmp_path), {"SECRET_KEY": "k" * 40, name: value})


def test_job_settings_are_read_from_the_environment(tmp_path):
    config = load_config(str(tmp_path), {"SECRET_KEY": "k" * 40, "JOB_THREADS": "0",
                                         "WEBHOOK_BACKOFF": "0.5, 2,10", "JOB_LEASE": "60"})
    assert (config["JOB_THREADS"], config["JOB_LEASE"]) == (0, 60.0)
    assert config["WEBHOOK_BACKOFF"] == (0.5, 2.0, 10.0)
    assert config["JOB_HISTORY"] == 30 * 86400  # by default
    assert load_config(str(tmp_path), {"SECRET_KEY": "k" * 40,
                                       "JOB_HISTORY": "7d"})["JOB_HISTORY"] == 7 * 86400
