"""Configuration: read from the environment once, in one place."""

import contextlib
import os
import re
import secrets
import tempfile

import click

from staging import fsync_dir

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


# Shortest signing key accepted: 32 characters of token_urlsafe carry 192 random bits. A
# made key has 64 (48 random bytes).
MIN_SECRET_KEY_LENGTH = 32
SECRET_KEY_FILE = "secret_key"


class ConfigError(click.ClickException):
    """A setting the service refuses to start with; `flask` shows it as one line, no traceback."""


def parse_size(text):
    """Turn '20G', '512M', '1048576' or '2TiB' into a number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number of bytes, or 512M, 20G, 2T)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """Turn '24h', '90m', '2d', '30s' or '3600' (seconds) into a number of seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a duration: {text!r} (use seconds, or 90m, 24h, 2d)")
    return int(match.group(1)) * _SECONDS[match.group(2).lower()]


def _flag(value):
    """Read an on/off environment value."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _positive(value, name):
    """A whole number of at least 1, or a ValueError naming the setting."""
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {value!r}")
    return number


def _count(value, name):
    """A whole number of 0 or more, or a ValueError naming the setting."""
    if not str(value).strip().isdigit():
        raise ValueError(f"{name} must be a whole number of 0 or more, not {value!r}")
    return int(value)


def _seconds(value, name):
    """A number of seconds above 0, or a ValueError naming the setting."""
    try:
        number = float(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}")
    return number


def _duration(value, name):
    """parse_duration, its ValueError naming the setting."""
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _schedule(value, name):
    """'30,120,300' as seconds (30.0, 120.0, 300.0): waits of 0 or more, at least one."""
    try:
        waits = tuple(float(part) for part in str(value).split(","))
    except ValueError:
        waits = ()
    if not waits or any(not wait >= 0 for wait in waits):
        raise ValueError(f"{name} must be seconds separated by commas, e.g. 30,120,300, "
                         f"not {value!r}")
    return waits


def _host_list(value):
    """DOWNLOAD_ALLOW_HOSTS: host names (or IP literals) separated by commas, compared in
    lower case; an IPv6 literal may be written with or without its brackets."""
    hosts = (host.strip().lower().removeprefix("[").removesuffix("]")
             for host in str(value).split(","))
    return frozenset(host for host in hosts if host)


def instance_folder(path=None, environ=None):
    """The instance folder as an absolute path: `path`, else IMAGESTORE_INSTANCE, each taken
    relative to the current directory (Flask refuses a relative one); None for Flask's
    default, `instance` beside app.py."""
    env = os.environ if environ is None else environ
    path = path or env.get("IMAGESTORE_INSTANCE")
    return os.path.abspath(path) if path else None


def prepared_by_master(environ=None):
    """Whether gunicorn's master has prepared the instance for this start: its on_starting
    hook (gunicorn.conf.py) sets IMAGESTORE_PREPARED=1, and the workers it forks inherit it."""
    env = os.environ if environ is None else environ
    return env.get("IMAGESTORE_PREPARED") == "1"


def _checked_key(key, source, advice):
    """key, unless it is too short to sign links with."""
    length = len(key.strip())
    if length < MIN_SECRET_KEY_LENGTH:
        found = "is empty" if length == 0 else f"has only {length} characters"
        raise ConfigError(f"{source} {found}; a signing key needs at least "
                          f"{MIN_SECRET_KEY_LENGTH}: {advice}")
    return key


def _secret_key(instance_path):
    """Make a secret once and keep it in the instance folder, so links survive restarts."""
    path = os.path.join(instance_path, SECRET_KEY_FILE)
    if not os.path.exists(path):
        _write_new_key(path)
    with open(path) as f:
        key = f.read().strip()
    return _checked_key(key, path, "most likely it was never written whole (a full disk, a "
                                   "crash); delete it to have a new key made (links signed "
                                   "with the old one stop working), or set SECRET_KEY")


def _write_new_key(path):
    """Write a new key at path so that it appears whole or not at all.

    The key goes to a temporary file in the same folder, reaches the disk, and only then is
    linked under its name; a link never replaces a file, so of several processes starting
    at once the first one's key stands and all of them read it.
    """
    folder = os.path.dirname(path)
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{SECRET_KEY_FILE}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
        fsync_dir(folder)
    except OSError as error:
        raise ConfigError(f"could not write a new secret key to {path}: {error}") from None


def _configured_key(env, instance_path):
    """SECRET_KEY when set (checked), else the key kept in the instance folder."""
    if "SECRET_KEY" not in env:
        return _secret_key(instance_path)
    return _checked_key(env["SECRET_KEY"], "SECRET_KEY",
                        "set it to a longer random string (python3 -c 'import secrets; "
                        "print(secrets.token_urlsafe(48))'), or unset it to have a key "
                        "made and kept in the instance folder")


def load_config(instance_path, environ=None):
    """Build the app's settings from the environment, with the instance folder as default home."""
    env = os.environ if environ is None else environ
    os.makedirs(instance_path, exist_ok=True)
    return {
        "DATABASE_URL": env.get("DATABASE_URL")
        or "sqlite:///" + os.path.join(instance_path, "imagestore.sqlite3"),
        "STORAGE_URL": env.get("STORAGE_URL") or "file://" + os.path.join(instance_path, "images"),
        "SECRET_KEY": _configured_key(env, instance_path),
        "MAX_IMAGE_SIZE": parse_size(env.get("MAX_IMAGE_SIZE", "20G")),
        "MAX_VIRTUAL_SIZE": parse_size(env.get("MAX_VIRTUAL_SIZE", "2T")),
        "PUBLIC_URL": (env.get("PUBLIC_URL") or "").rstrip("/") or None,
        "TRUST_PROXY_HEADERS": _flag(env.get("TRUST_PROXY_HEADERS", "")),
        "S3_REDIRECT_DOWNLOADS": _flag(env.get("S3_REDIRECT_DOWNLOADS", "1")),
        # Where uploads to an s3:// store are staged for inspection (local disk).
        "STAGING_DIR": env.get("STAGING_DIR") or os.path.join(instance_path, "tmp"),
        # Longest wait for each MiB of an upload body (or the rest, when less): a slower
        # client (under ~8.5 KiB/s) is cut off with 408 so it cannot hold a worker thread.
        "BODY_READ_TIMEOUT": float(env.get("BODY_READ_TIMEOUT", "120")),
        # Free space that uploads must leave on the store's and the database's disks, so
        # that deletes (which write to the database first) still find room when it is full.
        "MIN_FREE_SPACE": parse_size(env.get("MIN_FREE_SPACE", "64M")),
        # How long an unfinished tus upload (/uploads) is kept after it was created.
        "UPLOAD_EXPIRY": parse_duration(env.get("UPLOAD_EXPIRY") or "24h"),
        # How many qemu-img checks may run at once (one per CPU unless set), and the folder of
        # the lock files that count them, shared by every worker and server of this instance.
        "QEMU_IMG_SLOTS": (os.path.join(instance_path, "qemu-img-slots"),
                           _positive(env.get("QEMU_IMG_SLOTS") or os.cpu_count() or 1,
                                     "QEMU_IMG_SLOTS")),
        # Imports from a URL (docs/imports.md): whether they may reach loopback, private
        # and other non-public addresses, or only these hosts may; the seconds a connection
        # may take, and that a transfer may go without a byte before it fails.
        "DOWNLOAD_ALLOW_PRIVATE": _flag(env.get("DOWNLOAD_ALLOW_PRIVATE", "")),
        "DOWNLOAD_ALLOW_HOSTS": _host_list(env.get("DOWNLOAD_ALLOW_HOSTS", "")),
        "DOWNLOAD_CONNECT_TIMEOUT": float(env.get("DOWNLOAD_CONNECT_TIMEOUT", "10")),
        "DOWNLOAD_STALL_TIMEOUT": float(env.get("DOWNLOAD_STALL_TIMEOUT", "60")),
        # The bearer token GET /metrics wants; None leaves it open (docs/observability.md).
        "METRICS_TOKEN": env.get("METRICS_TOKEN") or None,
        # Where every worker keeps its figures, set by gunicorn.conf.py's master; None when
        # this process is alone (tests, the CLI) and keeps them in memory.
        "METRICS_MULTIPROC_DIR": env.get("PROMETHEUS_MULTIPROC_DIR") or None,
        # The audit log's file; None for standard error.
        "AUDIT_LOG": env.get("AUDIT_LOG") or None,
        **_job_settings(env),
    }


def _job_settings(env):
    """The background jobs' and webhooks' settings (docs/jobs.md)."""
    return {
        # Job threads in each serving process (gunicorn worker); 0: this process runs none.
        "JOB_THREADS": _count(env.get("JOB_THREADS", "2"), "JOB_THREADS"),
        # Longest wait before looking for work that another process queued.
        "JOB_POLL_INTERVAL": _seconds(env.get("JOB_POLL_INTERVAL", "5"), "JOB_POLL_INTERVAL"),
        # How long a claim holds without its heartbeat: a killed worker's job waits that long.
        "JOB_LEASE": _seconds(env.get("JOB_LEASE", "30"), "JOB_LEASE"),
        # How long failed jobs and webhook delivery records are kept: older ones are removed
        # as new ones are written, at each start and by `flask sweep`.
        "JOB_HISTORY": _duration(env.get("JOB_HISTORY") or "30d", "JOB_HISTORY"),
        # Waits before the 2nd, 3rd, ... try of a webhook delivery (API.md: at least 5 tries
        # over at least 10 minutes, the 3rd within 3 minutes of the 1st).
        "WEBHOOK_BACKOFF": _schedule(env.get("WEBHOOK_BACKOFF", "30,120,300,600,1800"),
                                     "WEBHOOK_BACKOFF"),
        # Longest wait to connect and for each read of the answer; a try takes at most 3x.
        "WEBHOOK_TIMEOUT": _seconds(env.get("WEBHOOK_TIMEOUT", "10"), "WEBHOOK_TIMEOUT"),
    }
