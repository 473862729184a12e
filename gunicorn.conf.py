"""gunicorn settings, read from the environment as Heroku sets it."""

import os
import resource

import gunicorn_worker

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threaded workers keep sending heartbeats while a thread moves a long upload or
# download, so a slow client is neither killed by the timeout nor blocks the worker.
# Ours is gunicorn's gthread worker that reads request heads without a thread, under
# a deadline, and answers gunicorn's own errors as JSON (gunicorn_worker.py).
worker_class = "gunicorn_worker.ImagestoreWorker"
# Seconds a connection has to send its whole request head (line and headers); then it
# is closed, with a 408 if part of a head came. It waits for them without a thread.
gunicorn_worker.ImagestoreWorker.head_timeout = float(
    os.environ.get("GUNICORN_HEAD_TIMEOUT", "10"))
# The worker tells when a head is complete as gunicorn's Python parser reads it; the
# optional C parser (gunicorn_h1c), if ever installed, is not what it was tested with.
http_parser = "python"
# Each upload or download holds a thread for its whole transfer, so a worker has many;
# they wait on sockets, not on the CPU. 50 clients sending a few bytes a second hold 50
# threads until BODY_READ_TIMEOUT (the app's) cuts them off.
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
# A worker holds at most this many connections, idle kept-alive ones and ones still
# sending their head included (those cost a file descriptor, no thread), and leaves
# room for its own files under the open-file limit. It accepts only while a thread is
# free, so a connection it cannot serve at once goes to the other workers or waits in
# the listen backlog instead of queueing behind slow bodies (reliability/run.py, slow).
_open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS")
                         or min(1000, max(threads + 16, _open_files - 100)))
# Only a worker that stops answering its heartbeat for this long is restarted.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
# Seconds an idle connection is kept for the client's next request; it holds a slot but
# no thread meanwhile. QEMU reading a signed link opens a new connection when it finds
# its idle one closed. qemu-img's hangs over HTTP come from QEMU itself, not from this
# close, and were the same with 0, 5 and 75 here (docs/downloads.md).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
accesslog = "-"
# The app alone decides whether X-Forwarded-Proto/-Host count (TRUST_PROXY_HEADERS,
# werkzeug's ProxyFix). gunicorn would otherwise honour them, and SCRIPT_NAME/PATH_INFO
# headers, from 127.0.0.1 and any Unix socket peer.
forwarded_allow_ips = ""
secure_scheme_headers = {}
forwarder_headers = ""
# gunicorn 27's control socket has one default path per user; several instances on
# one machine (tests, or two services side by side) would take it from each other.
control_socket_disable = True


def on_starting(server):
    """Prepare the instance once, here in the master, before any worker is forked.

    Workers doing it themselves all at once on a new instance could fail ('database is
    locked'), and one worker failing to boot stops gunicorn. It runs the release step,
    `flask --app app init-db`, as a child process so that the master imports none of the
    app (kill -HUP still loads new code); if that fails, gunicorn stops with its message.
    The workers inherit IMAGESTORE_PREPARED and leave the preparation alone (wsgi.py).
    """
    import subprocess
    import sys

    app_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
    command = [sys.executable, "-m", "flask", "--app", app_file, "init-db"]
    returncode = subprocess.run(command, check=False).returncode
    if returncode != 0:
        raise RuntimeError(f"flask --app app init-db failed (exit status {returncode}), "
                           "so the instance is not ready to serve")
    os.environ["IMAGESTORE_PREPARED"] = "1"
    # Set last, so that the release step above keeps its figures in memory, like the CLI.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _fresh_metrics_folder()


METRICS_FOLDER_PREFIX = "imagestore-metrics-"


def _fresh_metrics_folder():
    """A new private folder (mode 0700) for this start's figures, where every worker keeps
    its own files and a scrape of /metrics adds them all up (metrics.py).

    New at each start, so that nothing of an earlier one is counted again: prometheus_client
    wants it empty. The workers inherit it in their environment before they first import
    prometheus_client, which is when it picks its multiprocess mode; the master imports it
    only in child_exit, after this. The folders of masters that died without on_exit (a
    SIGKILL) are removed first: the master's pid is in the name.
    """
    import glob
    import shutil
    import tempfile

    for folder in glob.glob(os.path.join(tempfile.gettempdir(), METRICS_FOLDER_PREFIX + "*-*")):
        pid = os.path.basename(folder).removeprefix(METRICS_FOLDER_PREFIX).partition("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_FOLDER_PREFIX}{os.getpid()}-")


def child_exit(server, worker):
    """A worker is gone (it exited, or was killed): prometheus_client's bookkeeping for it.

    Its counters stay in its files and go on counting in every scrape, which is how the
    figures survive it; mark_process_dead removes only the files of gauges that count
    live processes, of which the service has none so far.
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """gunicorn stops: this start's metrics folder goes with it."""
    import shutil

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def post_worker_init(worker):
    """Start the worker's background job threads (jobs.py: webhook deliveries, imports):
    they run in every serving worker, so nothing beyond the Procfile's web line is needed."""
    import jobs

    jobs.start_job_threads(worker.wsgi)


def worker_exit(server, worker):
    """Stop the job threads of an exiting worker (a running job gets a few seconds, else
    its claim lapses and another worker takes it over). gunicorn also calls this in the
    master for a worker already gone; the master imports none of the app, so nothing then."""
    import sys

    jobs = sys.modules.get("jobs")
    if jobs is not None:
        jobs.stop_job_threads()
