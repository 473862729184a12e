"""Test and benchmark tooling, not part of the service: a real gunicorn started as a
platform starts it, and what the tests, bench/run.py and reliability/run.py do with it.

`start_server` runs the Procfile's web line on a free loopback port, on an instance folder
of its own (plus extra environment), and waits for /healthz; a `LiveServer` stops it, runs
admin commands (`flask --app app ...`) against its instance, creates accounts with tokens and
finds its worker pids (the master's children in /proc). `launch` and `stop_process` start
and stop any other server the same way (moto_server, nginx, a registry).

It imports nothing of the app: the server and the CLI run in processes of their own, so
that they read their settings as a deployment does, from the environment and the instance.
"""

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ALL_SCOPES = "image:read,write,delete"
# Settings that would point a server at another database, store or address than its
# instance's own: dropped from the caller's environment unless extra_env sets them.
INSTANCE_SETTINGS = ("DATABASE_URL", "STORAGE_URL", "PUBLIC_URL")
LOG_TAIL = 3000  # characters of a server's log quoted when it does not start


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_command(kind="web"):
    """The command of one Procfile line, so that what starts is what a platform starts."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == kind:
            return shlex.split(command)
    raise LookupError(f"no {kind} line in Procfile")


def child_pids(pid):
    """The pids of a process's children (a master's workers), lowest first; [] once it is
    gone."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return sorted(int(child) for child in text.split())


def http_status(url, timeout=2):
    """The HTTP status that url answers with, or None when nothing answers (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_for_http(url, process, timeout=30, ready=None):
    """Wait until url answers (with a status in ready, when given) while process runs;
    return the status, or raise RuntimeError when the process exits or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http_status(url)
        if status is not None and (ready is None or status in ready):
            return status
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        time.sleep(0.1)  # nothing to wait on but the port itself
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def stop_process(process, timeout=20):
    """SIGTERM a process we started, wait for it, and SIGKILL it if it takes too long."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(command, url, log_path=None, access_log=True, timeout=30, ready=None, **popen):
    """Start a server (its output appended to log_path, else dropped; stdout too only with
    access_log) and wait until url answers; kill it and raise, quoting the log, if not."""
    if log_path is None:
        out = err = subprocess.DEVNULL
    else:
        # A file, not a pipe: a pipe that nobody reads would block the server once full.
        err = open(log_path, "ab")  # noqa: SIM115 - the server holds it, we close ours
        out = err if access_log else subprocess.DEVNULL
    try:
        process = subprocess.Popen(command, stdout=out, stderr=err, **popen)
    finally:
        if log_path is not None:
            err.close()
    try:
        wait_for_http(url, process, timeout, ready)
    except RuntimeError as error:
        process.kill()  # it never served: nothing to finish gracefully
        process.wait()
        said = Path(log_path).read_text(errors="replace")[-LOG_TAIL:] if log_path else ""
        raise RuntimeError(f"{command[0]} did not start ({error}):\n{said}") from None
    return process


def run_flask(env, *args, check=True, timeout=120):
    """`flask --app app ARGS` in the project folder under env, as an admin runs it."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT,
                          env=env, check=check, capture_output=True, text=True,
                          timeout=timeout)


def server_env(instance, port, extra_env=None, workers=2):
    """The environment of a server on 127.0.0.1:port and the instance folder: the caller's
    own, with the venv's programs first, without INSTANCE_SETTINGS, then extra_env."""
    extra_env = extra_env or {}
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1",
           "IMAGESTORE_INSTANCE": str(instance), "WEB_CONCURRENCY": str(workers),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in INSTANCE_SETTINGS:
        env.pop(name, None)
    return {**env, **extra_env}


@dataclass
class LiveServer:
    """A real gunicorn serving the app on loopback: how it is started, and its process.

    access_log: gunicorn's stdout (the access log) goes into the log file too; start_timeout
    and ready: how long /healthz is given, and the statuses that count as started;
    stop_timeout: how long a stop may take before SIGKILL.
    """

    instance: Path
    env: dict
    log_path: Path
    command: list = field(default_factory=procfile_command)
    access_log: bool = True
    start_timeout: float = 30
    ready: tuple = (200,)
    stop_timeout: float = 20
    process: subprocess.Popen | None = None

    @classmethod
    def on(cls, instance, extra_env=None, port=None, workers=2, log_path=None, **settings):
        """A server (not started yet) on the instance folder, on port or a free one."""
        instance = Path(instance)
        env = server_env(instance, port or free_port(), extra_env, workers)
        return cls(instance, env, Path(log_path or instance / "gunicorn.log"), **settings)

    @property
    def port(self):
        return int(self.env["PORT"])

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Start gunicorn (again, after a stop) and wait until /healthz is ready."""
        self.instance.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = launch(self.command, f"{self.url}/healthz", self.log_path,
                              self.access_log, self.start_timeout, self.ready, cwd=ROOT,
                              env=self.env)
        return self

    def stop(self):
        """Stop gunicorn (SIGTERM; SIGKILL after stop_timeout); start() starts it again."""
        if self.process is not None:
            stop_process(self.process, self.stop_timeout)

    def flask(self, *args):
        """Run an admin command against this server's instance; return its stdout."""
        return run_flask(self.env, *args).stdout.strip()

    def token(self, username, scopes=ALL_SCOPES):
        """Create a user through the CLI and return a new bearer token of theirs."""
        self.flask("user", "create", username, f"{username}@example.com")
        return self.flask("token", "create", username, "--scope", scopes)

    def account(self, username, scopes=ALL_SCOPES):
        """Create a user through the CLI and return its bearer headers."""
        return {"Authorization": f"Bearer {self.token(username, scopes)}"}

    def worker_pids(self):
        """The pids of gunicorn's workers (the master's children), lowest first."""
        return child_pids(self.process.pid)

    def log_text(self):
        """What the server has logged so far."""
        return self.log_path.read_text(errors="replace")


def start_server(instance, extra_env=None, port=None, **options):
    """Start gunicorn from the Procfile's web line and wait until /healthz answers 200
    (options: those of LiveServer.on and LiveServer's fields)."""
    return LiveServer.on(instance, extra_env, port, **options).start()


def stop_server(server):
    """Stop a server that start_server started."""
    server.stop()
