"""Background jobs: rows of work in the database, claimed under a lease and run by a few
threads inside every serving process (docs/jobs.md).

A job is queued in the caller's own transaction (enqueue), so it commits or rolls back with
the change it belongs to. A thread claims a due job (FOR UPDATE SKIP LOCKED on PostgreSQL,
the write lock on SQLite), runs its kind's handler outside any transaction while a heartbeat
renews the claim, and then deletes the job, or schedules the next try after a failure, or
marks it failed after the last. A claim that nobody renews (its worker was killed) lapses,
and another thread takes the job over. Nothing here imports Flask.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC

from peewee import Case, PeeweeException, PostgresqlDatabase, fn

from models import Job, after_commit, db, write_transaction

log = logging.getLogger(__name__)

PENDING, FAILED = "pending", "failed"
# The end of the error of a job whose last try was cut off by its worker's death.
WORKER_STOPPED = "did not finish (its worker stopped)"
ERROR_LIMIT = 2000  # characters of a failure's message kept with the job
HOST = socket.gethostname()
# The shortest wait of an idle thread, so that a job seen due but taken by another thread
# (not yet committed) is looked at again soon rather than after the whole poll interval.
MIN_PAUSE = 0.05


@dataclass(frozen=True)
class Kind:
    """How jobs of one kind run: the handler and what to do when it fails."""

    handler: object
    backoff: tuple
    max_attempts: int
    timeout: float | None
    on_failure: object = None
    failed_payload: object = None


@dataclass
class Settings:
    """This process's settings (config.py's JOB_*), set by configure()."""

    threads: int = 2
    poll_interval: float = 5.0
    lease: float = 30.0
    stop_timeout: float = 5.0
    history: float = 30 * 86400.0  # seconds a failed job is kept


class Interrupted(Exception):
    """Raised by a handler that stops because its process is stopping (see stopping()):
    the job is let go to run again at once, and the attempt is not counted."""


KINDS = {}
settings = Settings()
_threads = []
_stop = threading.Event()
_wake = threading.Condition()
_wakes = [0]  # how many times wake() was called: a thread that saw a change does not wait
_running = threading.local()  # the job that this thread's handler is running (last_try)


def register(kind, handler, *, backoff=(10, 60, 300, 900), max_attempts=5, timeout=600,
             on_failure=None, failed_payload=None):
    """Run handler(payload) for jobs of kind, in a background thread.

    An exception is a failed try: the next one comes after backoff[try - 1] seconds (the
    last wait repeats), and after max_attempts tries the job is kept as failed, and
    on_failure(payload, error_text) is called. A handler running over timeout seconds
    (None: no limit) is presumed stuck: its claim lapses and the job is taken over.
    failed_payload(payload), if given, is what a failed job keeps of its payload (an
    import's drops the URL's password).
    """
    KINDS[kind] = Kind(handler, tuple(backoff), max_attempts, timeout, on_failure,
                       failed_payload)


def configure(config):
    """Take JOB_THREADS, JOB_POLL_INTERVAL, JOB_LEASE and JOB_HISTORY from a config mapping."""
    settings.threads = config.get("JOB_THREADS", settings.threads)
    settings.poll_interval = config.get("JOB_POLL_INTERVAL", settings.poll_interval)
    settings.lease = config.get("JOB_LEASE", settings.lease)
    settings.history = config.get("JOB_HISTORY", settings.history)


def database_now():
    """Seconds since the epoch by the database's clock: the one clock that all instances
    share, so that leases do not depend on the machines' clocks agreeing."""
    if isinstance(db.obj, PostgresqlDatabase):
        sql = "SELECT extract(epoch FROM clock_timestamp())"
    else:
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    return float(db.execute_sql(sql).fetchone()[0])


def _epoch(moment):
    """A datetime (aware, or naive UTC as models.utcnow) as seconds since the epoch."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def enqueue(kind, payload, run_at=None):
    """Queue a job of a registered kind; its id. Call it inside the caller's
    write_transaction(): the job commits or rolls back with it, and this process's job
    threads are woken once it has committed. run_at: a datetime, or None for now."""
    if kind not in KINDS:
        raise ValueError(f"no handler registered for jobs of kind {kind!r}")
    when = database_now() if run_at is None else _epoch(run_at)
    job = Job.create(kind=kind, payload=json.dumps(payload), run_at=when)
    after_commit(wake)
    return job.id


def wake():
    """Have this process's idle job threads look for due jobs now."""
    with _wake:
        _wakes[0] += 1
        _wake.notify_all()


def stopping():
    """Whether this process's job threads are stopping: a long handler may check it and
    raise Interrupted."""
    return _stop.is_set()


def last_try():
    """Whether the job that this thread's handler runs is on its last try (a handler that
    counts its failures tells a given-up one); False outside a handler."""
    job = getattr(_running, "job", None)
    return job is not None and job.attempts >= KINDS[job.kind].max_attempts


def _due(now):
    """Jobs that a thread of this process may claim at now."""
    return ((Job.state == PENDING) & (Job.kind.in_(sorted(KINDS))) & (Job.run_at <= now)
            & (Job.claimed_until.is_null() | (Job.claimed_until < now)))


def _claim():
    """Claim the next due job for this thread; None when there is none.

    The row is locked while the claim is written (SKIP LOCKED: threads elsewhere take the
    next row instead of waiting), so that two claimers never both get it. A job whose
    claim lapsed on its last try is failed instead: what kills its worker every time
    must not be tried for ever.
    """
    with write_transaction():
        now = database_now()
        query = Job.select().where(_due(now)).order_by(Job.run_at, Job.id).limit(1)
        if isinstance(db.obj, PostgresqlDatabase):
            query = query.for_update("FOR UPDATE SKIP LOCKED")
        job = query.first()
        if job is None:
            return None
        if job.claimed_by is not None:
            log.warning("job %s (%s): the claim of %s lapsed on try %s; taking it over",
                        job.id, job.kind, job.claimed_by, job.attempts)
        if job.attempts >= KINDS[job.kind].max_attempts:
            return _fail(job, f"try {job.attempts} {WORKER_STOPPED}")
        job.claimed_by = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        job.attempts += 1
        Job.update(claimed_by=job.claimed_by, claimed_until=now + settings.lease,
                   attempts=job.attempts).where(Job.id == job.id).execute()
    return job


def run_due_jobs(limit=None):
    """Claim and run due jobs one after another in the calling thread, until none is due
    (or limit were run); the number run. Tests and `flask --app app job run` use it."""
    count = 0
    while limit is None or count < limit:
        job = _claim()
        if job is None:
            break
        count += 1
        if job.state == PENDING:
            _run(job)
    return count


def _run(job):
    """Run a claimed job's handler under a heartbeat, then settle the job."""
    kind = KINDS[job.kind]
    heartbeat = _Heartbeat(job, kind.timeout)
    heartbeat.start()
    try:
        _call_handler(kind, job)
    except Exception as error:  # noqa: BLE001 - any failure of a handler is a failed try
        heartbeat.stop()
        _settle_failure(job, kind, error)
    else:
        heartbeat.stop()
        with write_transaction():
            done = Job.delete().where(Job.id == job.id, Job.claimed_by == job.claimed_by)
            if not done.execute():
                log.warning("job %s (%s) finished after its claim was taken over",
                            job.id, job.kind)


def _call_handler(kind, job):
    """kind's handler on job's payload, with job as this thread's running one (last_try)."""
    _running.job = job
    try:
        kind.handler(json.loads(job.payload))
    finally:
        _running.job = None


def _mine(job):
    """The condition that job's row is still held by this claim."""
    return (Job.id == job.id) & (Job.claimed_by == job.claimed_by)


def _settle_failure(job, kind, error):
    """After a failed try: the next try after its wait, or failed after the last one."""
    if isinstance(error, Interrupted):
        Job.update(claimed_by=None, claimed_until=None, attempts=Job.attempts - 1,
                   run_at=database_now()).where(_mine(job)).execute()
        return
    text = (str(error) or type(error).__name__)[:ERROR_LIMIT]
    log.warning("job %s (%s) try %s of %s failed: %s", job.id, job.kind, job.attempts,
                kind.max_attempts, text)
    with write_transaction():
        if job.attempts >= kind.max_attempts:
            _fail(job, text, _mine(job))
            return
        wait = kind.backoff[min(job.attempts, len(kind.backoff)) - 1] if kind.backoff else 0
        Job.update(claimed_by=None, claimed_until=None, last_error=text,
                   run_at=database_now() + wait).where(_mine(job)).execute()


def _fail(job, text, where=None):
    """Mark job failed for good (kept, with its error and what its kind keeps of its
    payload), then tell its kind's on_failure (which is given the whole payload)."""
    where = (Job.id == job.id) if where is None else where
    job.state, job.last_error = FAILED, text
    kind = KINDS[job.kind]
    kept = job.payload if kind.failed_payload is None else json.dumps(
        kind.failed_payload(json.loads(job.payload)))
    if not Job.update(state=FAILED, claimed_by=None, claimed_until=None, last_error=text,
                      payload=kept).where(where).execute():
        return job  # taken over meanwhile: the new holder settles it
    log.error("job %s (%s) failed after %s tries: %s", job.id, job.kind, job.attempts, text)
    prune_failed()  # so that failed jobs are kept JOB_HISTORY long, not for ever
    on_failure = kind.on_failure
    if on_failure is not None:
        after_commit(lambda: _tell_failure(on_failure, job))
    return job


def prune_failed():
    """Remove the failed jobs whose last try is older than JOB_HISTORY; how many. The age
    is by the database's clock, as run_at is."""
    cutoff = database_now() - settings.history
    return Job.delete().where((Job.state == FAILED) & (Job.run_at < cutoff)).execute()


def _tell_failure(on_failure, job):
    """Call a kind's on_failure; its own failure is logged, the job stays failed."""
    try:
        on_failure(json.loads(job.payload), job.last_error)
    except Exception:  # logged with its traceback; the job stays failed
        log.exception("on_failure of job %s (%s) failed", job.id, job.kind)


class _Heartbeat(threading.Thread):
    """Renews a running job's claim every third of the lease, until the handler returns or
    has run for its kind's timeout (then the claim lapses and the job is taken over)."""

    def __init__(self, job, timeout):
        super().__init__(name=f"job-{job.id}-heartbeat", daemon=True)
        self.job = job
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.done = threading.Event()

    def stop(self):
        self.done.set()
        self.join()

    def run(self):
        while not self.done.wait(settings.lease / 3):
            if self.deadline is not None and time.monotonic() > self.deadline:
                log.error("job %s (%s) has run past its timeout; letting its claim lapse",
                          self.job.id, self.job.kind)
                return
            if not self._renew():
                log.warning("job %s (%s): its claim was taken over", self.job.id, self.job.kind)
                return

    def _renew(self):
        """Extend the claim; False when it is no longer this claim's."""
        try:
            with db.connection_context():
                until = database_now() + settings.lease
                return Job.update(claimed_until=until).where(_mine(self.job)).execute() == 1
        except PeeweeException as error:  # the database is away: try at the next beat
            log.warning("job %s: could not renew its claim: %s", self.job.id, error)
            return True


def _next_due():
    """Seconds until the next job of this process's kinds is due, or its claim lapses
    (at most the poll interval); 0 or less when one is due now."""
    ready = Case(None, [(Job.claimed_until > Job.run_at, Job.claimed_until)], Job.run_at)
    soonest = Job.select(fn.MIN(ready)).where(
        (Job.state == PENDING) & Job.kind.in_(sorted(KINDS))).scalar()
    if soonest is None:
        return settings.poll_interval
    return min(soonest - database_now(), settings.poll_interval)


def _work(app):
    """A job thread: run due jobs; between them wait for the next, a wake() or the poll."""
    while not _stop.is_set():
        seen = _wakes[0]
        try:
            with app.app_context(), db.connection_context():
                # A read first: an idle poll takes no lock (on SQLite, no write lock).
                pause = _next_due()
                if pause <= 0:
                    pause = 0 if run_due_jobs(limit=1) else MIN_PAUSE
        except Exception:  # logged; the thread must live on
            log.exception("job thread: looking for work failed")
            pause = settings.poll_interval
        if pause > 0:
            with _wake:
                if _wakes[0] == seen and not _stop.is_set():
                    _wake.wait(max(pause, MIN_PAUSE))


def start_job_threads(app):
    """Start this process's job threads (JOB_THREADS of them) once; app gives the
    settings, and an app context to each job. gunicorn's workers call it
    (post_worker_init in gunicorn.conf.py); CLI commands and tests do not."""
    if _threads:
        return
    configure(app.config)
    _stop.clear()
    for number in range(settings.threads):
        thread = threading.Thread(target=_work, args=(app,), name=f"jobs-{number}",
                                  daemon=True)
        thread.start()
        _threads.append(thread)


def stop_job_threads(timeout=None):
    """Stop the job threads: a running job may finish within timeout seconds (the
    settings' stop_timeout); one still running is left to lapse and be taken over."""
    _stop.set()
    wake()
    deadline = time.monotonic() + (settings.stop_timeout if timeout is None else timeout)
    for thread in _threads:
        thread.join(max(0, deadline - time.monotonic()))
    left = [thread.name for thread in _threads if thread.is_alive()]
    if left:
        log.warning("job threads %s still running at exit; their claims will lapse and "
                    "be taken over", ", ".join(left))
    else:
        _stop.clear()  # stopping() is over: handlers run later here (tests) go on working
    _threads.clear()
