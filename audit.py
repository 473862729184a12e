"""The audit log: one JSON object a line for every change, every file read and every failed
authentication, through Python's logging, to standard error or to the file AUDIT_LOG names.

What a line holds is in docs/observability.md. Never a secret: callers pass no token, link
or password, and record() removes the user and password from any URL in any field all the
same (an import's download_url may carry them).
"""

import logging
import re
import sys
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler

import orjson

LOGGER = logging.getLogger("imagestore.audit")
ACTIONS = frozenset({"upload", "refuse", "delete", "download", "link.create", "link.use",
                     "import", "auth.failure"})
# The user and password part of a URL (scheme://user:password@host), wherever it stands in
# a text: greedy up to the last "@" before the host, as URL parsers read it.
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


class JsonLine(logging.Formatter):
    """A record's audit entry as one line of JSON."""

    def format(self, record):
        return orjson.dumps(record.audit).decode()


def configure(path=None):
    """Send the audit log to path (appended to; a file moved away by logrotate is opened
    anew), or to standard error; each call replaces the last one's handler."""
    handler = WatchedFileHandler(path, encoding="utf-8") if path else logging.StreamHandler(
        sys.stderr)
    handler.setFormatter(JsonLine())
    for old in LOGGER.handlers:
        LOGGER.removeHandler(old)
        old.close()
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # the audit log is its own stream, not the app's log


def without_credentials(text):
    """text with the user and password taken out of every URL in it."""
    return _USERINFO.sub(r"\1", text)


def image_fields(image):
    """The audit fields of an image (with its namespace and their owner loaded)."""
    if image is None:
        return {}
    namespace = image.namespace
    return {"image_id": image.id, "name": image.name,
            "namespace": f"{namespace.path}@{namespace.user.username}" if namespace else None,
            "sha256": image.sha256, "bytes": image.size}


def record(action, *, user=None, token_id=None, client=None, image=None, status=None,
           **fields):
    """Write one audit line: who (user, token id, client address) did action, to which
    image, answered with status; fields add to those (name, namespace and bytes of a
    refused upload, rule, reason, route, source, expires_at) or replace the image's."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "action": action, "user": getattr(user, "username", user), "token_id": token_id,
             "client": client, "image_id": None, "name": None, "namespace": None,
             "sha256": None, "bytes": None, **image_fields(image), "status": status, **fields}
    LOGGER.info(action, extra={"audit": {key: without_credentials(value)
                                         if isinstance(value, str) else value
                                         for key, value in entry.items()}})
