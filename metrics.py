"""Prometheus metrics: what the service counts, and the text that GET /metrics answers.

Under gunicorn each worker writes its figures to files of its own in PROMETHEUS_MULTIPROC_DIR
(a private folder that gunicorn.conf.py's master makes fresh at each start), and a scrape
adds up the files of every worker, those of dead workers included: the figures are the same
whichever worker answers, and do not drop when a worker is replaced. prometheus_client picks
that mode when it is first imported, from the environment the master set. Anywhere else (the
tests' Flask client, the CLI) the figures live in this process. The names and what each
counts are in docs/observability.md.
"""

import re

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

import metrics_files

# The classic text format: every Prometheus version reads it (the contract's "Prometheus
# text format"), whatever its Accept header prefers.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Seconds. JSON answers take milliseconds, uploads of large images minutes. Few buckets,
# as every one is a series for each route and method, and every series costs each scrape
# its time (docs/observability.md).
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10, 60, 300, float("inf"))
# Label values come from a short fixed list or a stable name: a client must not be able to
# make a new time series per request (a made-up method, a path, a message).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NAME = re.compile(r"[a-z0-9_.]{1,40}")
UNMATCHED = "unmatched"  # the route of a request that matched none (404, 405)

# No `_created` series beside each counter: the multiprocess mode has none either, so a
# process alone shows what gunicorn's workers show.
disable_created_metrics()
REGISTRY = CollectorRegistry()  # this process's figures, when not under gunicorn
REQUESTS = Counter("imagestore_http_requests",
                   "Requests answered, by route (the URL rule), method and status",
                   ("route", "method", "status"), registry=REGISTRY)
DURATIONS = Histogram(
    "imagestore_http_request_duration_seconds",
    "Seconds the app took to answer, by route and method (an upload's body included, the "
    "sending of a download's file not)",
    ("route", "method"), buckets=DURATION_BUCKETS, registry=REGISTRY)
RECEIVED = Counter("imagestore_received_bytes",
                   "Bytes of image bodies received (uploads, stored or refused)",
                   registry=REGISTRY)
SENT = Counter("imagestore_sent_bytes", "Bytes of image files sent (downloads, 200 and 206)",
               registry=REGISTRY)
UPLOADS = Counter("imagestore_uploads", "Uploads by outcome: stored, or the rule that refused it",
                  ("outcome",), registry=REGISTRY)
DOWNLOADS = Counter("imagestore_downloads",
                    "Downloads (GET of a file) by way (file with a token, or a signed link) "
                    "and status (200, 206 a range, 304 not modified, 302 to the store)",
                    ("via", "status"), registry=REGISTRY)
IMPORTS = Counter("imagestore_imports", "Imports from a URL by outcome", ("outcome",),
                  registry=REGISTRY)
WEBHOOKS = Counter("imagestore_webhook_deliveries", "Webhook delivery tries by outcome",
                   ("outcome",), registry=REGISTRY)


def label(value):
    """value as a label if it is a short stable name, else "other"."""
    value = str(value)
    return value if NAME.fullmatch(value) else "other"


def count_request(route, method, status, seconds):
    """One answered request: route is the URL rule (None when none matched)."""
    route, method = route or UNMATCHED, method if method in METHODS else "other"
    REQUESTS.labels(route, method, str(int(status))).inc()
    DURATIONS.labels(route, method).observe(seconds)


def count_received(nbytes):
    """Bytes of an image body, as they are read."""
    if nbytes:
        RECEIVED.inc(nbytes)


def count_upload(outcome):
    """An upload ended: "stored", or the short name of the rule that refused it."""
    UPLOADS.labels(label(outcome)).inc()


def count_download(via, status, sent_bytes):
    """A download answered: via is "file" or "link"; sent_bytes the body's length."""
    DOWNLOADS.labels(label(via), str(int(status))).inc()
    if sent_bytes:
        SENT.inc(sent_bytes)


def count_import(outcome):
    """An import from a URL ended: "stored", or a short name of why not (e.g. "http_error",
    "too_large", "timeout", "refused_address", "interrupted", or an upload rule's name)."""
    IMPORTS.labels(label(outcome)).inc()


def count_webhook_delivery(outcome):
    """One try to deliver a webhook event: "delivered", "failed" (tried again later) or
    "gave_up" (the last try failed)."""
    WEBHOOKS.labels(label(outcome)).inc()


def render(stored_images, stored_bytes, multiproc_dir=None):
    """The text GET /metrics answers; multiproc_dir is PROMETHEUS_MULTIPROC_DIR, if set."""
    stored = "".join(
        f"# HELP {name} {help_text}\n# TYPE {name} gauge\n" + metrics_files.line(name, "", value)
        for name, help_text, value in (
            ("imagestore_stored_images", "Images stored (with their file)", stored_images),
            ("imagestore_stored_image_bytes", "Bytes of the stored images' files",
             stored_bytes))).encode()
    if not multiproc_dir:
        return generate_latest(REGISTRY) + stored
    totals = metrics_files.read_folder(multiproc_dir)
    if totals is None:  # a kind of file this module does not write: the library's reader
        return generate_latest(MultiProcessCollector(None, path=multiproc_dir)) + stored
    return metrics_files.text(totals).encode() + stored
