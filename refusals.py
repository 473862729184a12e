"""The short, stable name of what ended an upload that was not stored.

/metrics counts uploads by these names (imagestore_uploads_total{outcome=...}) and the
audit log's `refuse` lines carry them as `rule` (docs/observability.md lists them all).
The rules of the file itself are qcow2's REFUSAL_RULES; the others come from the request
(its headers, its body, its name and namespace), from its owner's or namespace's quota, and
from the service (a full disk, a store that is down, an error).
"""

from werkzeug.exceptions import HTTPException

from digests import MISMATCH
from errors import ApiError, ValidationError, disk_full
from image_changes import NAME_TAKEN
from qcow2 import ImageRefused
from quotas import QuotaExceeded
from storage import StorageUnavailable

# What each status of an ApiError (or of Werkzeug's own, a 413 of a multipart form) means
# during an upload; the 400s of the body are uploads.cut_off and uploads.broken_framing.
RULE_OF_STATUS = {
    400: "broken_body",
    403: "forbidden",
    408: "too_slow",
    411: "length_required",
    413: "too_large",
    415: "content_encoding",
    507: "disk_full",
}
# The ValidationError fields of an upload, by the rule they stand for.
RULE_OF_FIELD = {"name": "name", "namespace": "namespace", "file": "no_file"}


def refusal_rule(error):
    """The name of the rule that error stands for, raised while an upload was handled."""
    if isinstance(error, ImageRefused):
        return error.rule
    if isinstance(error, ValidationError):
        return _field_rule(error)
    if isinstance(error, StorageUnavailable):
        return "store_unavailable"
    if isinstance(error, QuotaExceeded):  # a 403 of its own: which limit ran out
        return f"quota_{error.unit}"
    if isinstance(error, ApiError | HTTPException):
        status = error.status if isinstance(error, ApiError) else error.code
        return RULE_OF_STATUS.get(status, f"status_{status}")
    return "disk_full" if disk_full(error) else "error"


def _field_rule(error):
    """The rule of a ValidationError. A file refused by qcow2 reaches the client as a
    ValidationError("file") raised while its ImageRefused was handled (api.py): that
    refusal is the error's __context__, which Python sets on every exception raised in an
    except block."""
    if isinstance(error.__context__, ImageRefused):
        return error.__context__.rule
    field, [message] = next(iter(error.fields.items()))
    if field == "name" and message == NAME_TAKEN:
        return "name_taken"
    if field == "file" and message.startswith(MISMATCH):
        return "sha256_mismatch"
    return RULE_OF_FIELD.get(field, field)
