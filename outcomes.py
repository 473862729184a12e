"""How a request's upload ended, for the operator: counted in /metrics (uploads by outcome)
and written to the audit log (`upload`, `refuse`), the same for every way an image comes in:
POST /images and the web UI's form (api.py), tus (tus.py); an import refused at its POST
is audited alone. docs/observability.md says what a line holds and which rule names there
are."""

from functools import partial

from flask import after_this_request

import audit
import metrics
from auth import who
from refusals import refusal_rule

NAME_KEPT = 100  # characters of a refused upload's name and namespace in its audit line
SOURCE_KEPT = 200  # characters of a refused import's download_url, its password taken out


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
    audited("refuse", response.status_code, rule=rule, name=_kept(name, NAME_KEPT),
            namespace=_kept(namespace, NAME_KEPT))
    return response


def refused_import(error, name=None, namespace=None, source=None):
    """Audit an import that error refused at its POST, once its answer is made; not
    counted, as it is no import (docs/observability.md). name, namespace and source (the
    download_url) as the client sent them."""
    after_this_request(partial(_refused_import, refusal_rule(error), name, namespace, source))


def _refused_import(rule, name, namespace, source, response):
    # The password goes before the cut: a cut inside it would hide it from the audit log's
    # own filter, which looks for the "@" after it.
    source = source and audit.without_credentials(source)
    audited("refuse", response.status_code, rule=rule, name=_kept(name, NAME_KEPT),
            namespace=_kept(namespace, NAME_KEPT), source=_kept(source, SOURCE_KEPT))
    return response


def _kept(text, length):
    """text cut to length, None for none or an empty one."""
    return (text or "")[:length] or None
