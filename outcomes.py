"""How a request's upload ended, for the operator: counted in /metrics (uploads by outcome)
and written to the audit log (`upload`, `refuse`), the same for every way an image comes in:
POST /images and the web UI's form (api.py), tus (tus.py). docs/observability.md says what
a line holds and which rule names there are."""

from functools import partial

from flask import after_this_request

import audit
import metrics
from auth import who
from refusals import refusal_rule

NAME_KEPT = 100  # characters of a refused upload's name and namespace in its audit line


def audited(action, status, image=None, **fields):
    """One audit line for this request: its user, token and address, and what they did."""
    audit.record(action, status=status, image=image, **who(), **fields)


def uploaded(image, status=201):
    """Count and audit a stored upload, answered with status."""
    metrics.count_upload("stored")
    audited("upload", status, image)


def refused(error, name=None, namespace=None):
    """Count and audit an upload that error refused, once its answer is made (the line
    carries its status); name and namespace as the client sent them."""
    after_this_request(partial(_refused, refusal_rule(error), name, namespace))


def _refused(rule, name, namespace, response):
    metrics.count_upload(rule)
    audited("refuse", response.status_code, rule=rule, name=(name or "")[:NAME_KEPT] or None,
            namespace=(namespace or "")[:NAME_KEPT] or None)
    return response
