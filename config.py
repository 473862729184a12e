"""Configuration: read from the environment once, in one place."""

import os
import re
import secrets

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text):
    """Turn '20G', '512M', '1048576' or '2TiB' into a number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use a number of bytes, or 512M, 20G, 2T)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _flag(value):
    """Read an on/off environment value."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _positive(value, name):
    """A whole number of at least 1, or a ValueError naming the setting."""
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {value!r}")
    return number


def _secret_key(instance_path):
    """Make a secret once and keep it in the instance folder, so links survive restarts."""
    path = os.path.join(instance_path, "secret_key")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)
    # O_EXCL: when two workers start together, one writes and both read the same key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            return f.read().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def load_config(instance_path, environ=None):
    """Build the app's settings from the environment, with the instance folder as default home."""
    env = os.environ if environ is None else environ
    os.makedirs(instance_path, exist_ok=True)
    return {
        "DATABASE_URL": env.get("DATABASE_URL")
        or "sqlite:///" + os.path.join(instance_path, "imagestore.sqlite3"),
        "STORAGE_URL": env.get("STORAGE_URL") or "file://" + os.path.join(instance_path, "images"),
        "SECRET_KEY": env.get("SECRET_KEY") or _secret_key(instance_path),
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
        # How many qemu-img checks may run at once (one per CPU unless set), and the folder of
        # the lock files that count them, shared by every worker and server of this instance.
        "QEMU_IMG_SLOTS": (os.path.join(instance_path, "qemu-img-slots"),
                           _positive(env.get("QEMU_IMG_SLOTS") or os.cpu_count() or 1,
                                     "QEMU_IMG_SLOTS")),
    }
