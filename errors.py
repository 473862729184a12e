"""Errors that the rules raise, and the one place that turns every error into JSON."""

import errno

from flask import jsonify
from werkzeug.exceptions import HTTPException

from storage import StorageUnavailable


class ApiError(Exception):
    """An error with a status and a message: {"message": "..."}."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ValidationError(Exception):
    """A 400 whose body maps field names to lists of messages."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.fields = {field: [message]}


def not_found():
    """The one answer for a missing image and for one the user may not see."""
    return ApiError(404, "Not Found")


MISSING_TOKEN = "Missing bearer token"


def unauthorized(message=MISSING_TOKEN):
    """401 asking for a bearer token: none came, or it names no token; also the answer
    without a token for anything that is not public, whether it exists or not."""
    return ApiError(401, message, {"WWW-Authenticate": 'Bearer realm="imagestore"'})


def _json(status, body, headers=None):
    response = jsonify(body)
    response.status_code = status
    response.headers.extend(headers or {})
    return response


DISK_FULL = "Insufficient Storage: the image store is full"


def disk_full(error):
    """Whether error, or an error it came from, says that a disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(error):  # SQLite's word for it
            return True
        # peewee keeps the driver's error in .orig
        error = error.__cause__ or error.__context__ or getattr(error, "orig", None)
    return False


def storage_unavailable_message(error):
    """What a client is told about a store that is down: its reason, never a path."""
    if error.reason:
        return f"Image store unavailable: {error.reason}"
    return "Image store unavailable, try again later"


def register_error_handlers(app):
    """Make every error, werkzeug's own included, a JSON answer without a trace."""

    @app.errorhandler(ApiError)
    def api_error(error):
        return _json(error.status, {"message": error.message}, error.headers)

    @app.errorhandler(ValidationError)
    def validation_error(error):
        return _json(400, error.fields)

    @app.errorhandler(HTTPException)
    def http_error(error):
        # Keep werkzeug's headers (Allow on 405, WWW-Authenticate) but not its HTML.
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return _json(error.code or 500, {"message": error.name}, headers)

    @app.errorhandler(StorageUnavailable)
    def storage_unavailable(error):
        # The message names the bucket or the folder: log it, answer with the reason alone.
        app.logger.error("image store unavailable: %s", error)
        return _json(503, {"message": storage_unavailable_message(error)}, {"Retry-After": "30"})

    @app.errorhandler(Exception)
    def unexpected_error(error):
        # Any write may meet a full disk (fsync, rename, SQLite), not only the body's.
        if disk_full(error):
            app.logger.warning("disk full: %s", error)
            return _json(507, {"message": DISK_FULL})
        app.logger.exception("unhandled error")
        return _json(500, {"message": "Internal Server Error"})
