"""Webhooks in Djinn's format: an `images` event for each webhook of the image's namespace
and its parents, queued in the transaction of the change and delivered by jobs.py.

The body is rendered when the event happens (a `deleted` event shows the image as it was)
and kept with the job; each try signs those exact bytes with the webhook's secret, is
recorded as a WebhookDelivery and counted in /metrics, and a failed one is tried again
after WEBHOOK_BACKOFF.
"""

import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import socket
import threading
import uuid
from datetime import timedelta
from functools import partial
from urllib.parse import urlsplit

import jobs
import metrics
from models import Namespace, Webhook, WebhookDelivery, utcnow, write_transaction
from representations import image_json

KIND = "webhook"
ACTIONS = ("created", "deleted", "downloaded")
MAX_URL_LENGTH = 2048
# The whole of a try is cut off at this many times WEBHOOK_TIMEOUT: the timeout itself
# bounds the connect and each read, not a receiver that trickles its answer.
TRY_TIMEOUTS = 3
USER_AGENT = "imagestore-webhooks"
EVENT_ID_HEADER = "X-Imagestore-Event-ID"  # not in Djinn's format, which has no event id
log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """A try that did not get a 2xx answer; the job is tried again."""


def register_job(config):
    """Register the delivery job with jobs.py: WEBHOOK_BACKOFF's waits between tries, one
    try more than there are waits, WEBHOOK_TIMEOUT for each."""
    timeout = config["WEBHOOK_TIMEOUT"]
    backoff = config["WEBHOOK_BACKOFF"]
    jobs.register(KIND, partial(deliver, timeout=timeout), backoff=backoff,
                  max_attempts=len(backoff) + 1, timeout=TRY_TIMEOUTS * timeout + 30)


def check_url(url):
    """url, if it is an http(s) URL with a host that fits; else a ValueError saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL with a host: {url!r}")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a URL of at most {MAX_URL_LENGTH} characters")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    return url


def add_webhook(namespace, url, secret):
    """A new webhook on namespace (checked: see check_url; a secret is required)."""
    if not secret:
        raise ValueError("a webhook needs a secret to sign its deliveries with")
    return Webhook.create(namespace=namespace, url=check_url(url), secret=secret)


def webhooks_for(namespace):
    """The webhooks that hear of images in namespace: its own and its parents'."""
    if namespace is None:
        return []
    segments = namespace.path.split("/")
    paths = ["/".join(segments[:depth]) for depth in range(1, len(segments) + 1)]
    return list(Webhook.select().join(Namespace).where(
        Namespace.user == namespace.user_id, Namespace.path.in_(paths)).order_by(Webhook.id))


def event_body(action, image, base_url):
    """The exact body of an event: {"action": ..., "image": <the image object>}."""
    return json.dumps({"action": action, "image": image_json(image, base_url)},
                      separators=(",", ":"), ensure_ascii=False)


def emit(action, image, base_url):
    """Queue one delivery of an `images` event per webhook that hears of image; the
    number queued. Call it inside the write_transaction() of the change (image loaded
    with its relations), so that the event is sent if and only if the change commits."""
    if action not in ACTIONS:
        raise ValueError(f"not an images action: {action!r}")
    hooks = webhooks_for(image.namespace) if image.namespace_id is not None else []
    if hooks:
        body, event = event_body(action, image, base_url), uuid.uuid4().hex
        for hook in hooks:
            jobs.enqueue(KIND, {"webhook": hook.id, "event": event, "action": action,
                                "body": body})
    return len(hooks)


def signed_headers(hook, event, body):
    """The headers of a delivery: Djinn's (the event's name, the webhook's id, the
    HMAC-SHA256 of the body) and the event's id, the same in every try of it, by which a
    receiver drops a repeat (delivery is at least once)."""
    digest = hmac.new(hook.secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "Accept": "*/*", "User-Agent": USER_AGENT,
            "X-Djinn-CI-Event": "images", "X-Djinn-CI-Hook-ID": str(hook.id),
            "X-Djinn-CI-Signature": f"sha256={digest}", EVENT_ID_HEADER: event}


def deliver(payload, timeout):
    """One try of a delivery job: POST the body, record the try (the webhook's records
    past JOB_HISTORY go), raise if it failed. A webhook deleted since the event was queued
    gets nothing."""
    hook = Webhook.get_or_none(Webhook.id == payload["webhook"])
    if hook is None:
        log.info("webhook %s is gone; its %s event is dropped", payload["webhook"],
                 payload["action"])
        return
    body = payload["body"].encode()
    headers = signed_headers(hook, payload["event"], body)
    status, error = post(hook.url, body, headers, timeout)
    record_try(hook, payload, status, error)
    prune_deliveries(hook)
    delivered = error is None and 200 <= status < 300
    metrics.count_webhook_delivery(
        "delivered" if delivered else "gave_up" if jobs.last_try() else "failed")
    if not delivered:
        raise DeliveryFailed(f"webhook {hook.id}: {error or f'HTTP {status}'}")


def record_try(hook, payload, status, error):
    """Write down one try: the next try number of this event at this webhook."""
    with write_transaction():
        tries = WebhookDelivery.select().where(WebhookDelivery.webhook == hook,
                                               WebhookDelivery.event == payload["event"])
        return WebhookDelivery.create(webhook=hook, event=payload["event"],
                                      action=payload["action"], try_number=tries.count() + 1,
                                      status=status, error=error)


def prune_deliveries(hook=None):
    """Remove the delivery records older than JOB_HISTORY (jobs.settings, as for failed
    jobs), of one webhook or of all; how many."""
    old = WebhookDelivery.created_at < utcnow() - timedelta(seconds=jobs.settings.history)
    if hook is not None:
        old &= WebhookDelivery.webhook == hook
    return WebhookDelivery.delete().where(old).execute()


def post(url, body, headers, timeout):
    """POST body to url: (HTTP status, None), or (None, why it failed).

    timeout bounds the connect and each read; a watchdog shuts the socket at
    TRY_TIMEOUTS times it, so that a receiver trickling its answer cannot hold the thread.
    Redirects are not followed (a 3xx is a failed try).
    """
    parts = urlsplit(url)
    connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                        else http.client.HTTPConnection)
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cut = threading.Event()
    watchdog = threading.Timer(TRY_TIMEOUTS * timeout, _cut_off, (connection, cut))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", target, body, headers)
        status, error = connection.getresponse().status, None
    except (OSError, http.client.HTTPException) as failure:
        status, error = None, _describe(failure, timeout)
    finally:
        watchdog.cancel()
        connection.close()
    if cut.is_set():  # what was read before the cut may even parse, as a cut-off head
        return None, f"timed out after {TRY_TIMEOUTS * timeout:g} s in all"
    return status, error


def _cut_off(connection, cut):
    """End a try that has taken too long: a blocked read returns at once."""
    cut.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # closed meanwhile: the try has ended anyway
            sock.shutdown(socket.SHUT_RDWR)


def _describe(error, timeout):
    """A short line for a failed try."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"host not found: {error.strerror}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
