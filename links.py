"""Signed download links: a URL that serves one image to whoever holds it, until it expires."""

import hashlib
import json
import re
import time
from datetime import UTC, datetime

from itsdangerous import BadSignature, URLSafeSerializer

from errors import ApiError, ValidationError

DEFAULT_EXPIRES_IN = 3600
MAX_EXPIRES_IN = 7 * 24 * 3600
# QEMU's curl driver ends a request that takes longer than its timeout (default 5 s):
# an I/O error, or a request QEMU 7.2 loses when another one finishes in the same
# wake-up (docs/downloads.md). A busy host or a slow link can take 5 s; 60 s is
# nginx's own send and read timeout.
QEMU_TIMEOUT = 60
# The driver's default, spelled out because a larger one hurts: libcurl reads at most
# 101 x 16 KiB of a response per wake-up and finishes the rest in a later one, where
# QEMU 7.2 can lose it. Each request asks for the guest's read plus this much.
QEMU_READAHEAD = 256 * 1024


def parse_expires_in(value):
    """Seconds from the query: default one hour, 1 second to 7 days."""
    if value is None:
        return DEFAULT_EXPIRES_IN
    # ASCII digits only, and few of them: "²".isdigit() is true, and int() of 5000 digits raises.
    if not re.fullmatch(r"[0-9]{1,7}", value) or not 1 <= int(value) <= MAX_EXPIRES_IN:
        raise ValidationError(
            "expires_in", f"Must be a whole number of seconds from 1 to {MAX_EXPIRES_IN}")
    return int(value)


def _serializer(secret_key):
    return URLSafeSerializer(secret_key, salt="imagestore.link")


def _image_tag(image):
    # Binds the link to this very image: a later image that reuses the id does not match.
    return hashlib.sha256(image.storage_key.encode()).hexdigest()[:16]


def sign_link(secret_key, image, expires_in, now=None):
    """Return (token, expiry as an aware UTC datetime) for a link to image."""
    expires_at = int(now if now is not None else time.time()) + expires_in
    token = _serializer(secret_key).dumps([image.id, _image_tag(image), expires_at])
    return token, datetime.fromtimestamp(expires_at, UTC)


def read_link(secret_key, token, now=None):
    """Return (image id, tag) from a token; 403 when it is forged, from another key, or expired."""
    try:
        image_id, tag, expires_at = _serializer(secret_key).loads(token)
    except (BadSignature, ValueError, TypeError):
        raise ApiError(403, "Link is not valid") from None
    if (now if now is not None else time.time()) >= expires_at:
        raise ApiError(403, "Link has expired")
    return image_id, tag


def link_matches(image, tag):
    """Whether a link's tag names this image (and not an older one with its id)."""
    return image is not None and _image_tag(image) == tag


def _curl_driver(url):
    """QEMU's curl driver for a URL: its name must match the URL's scheme."""
    return "https" if url.startswith("https:") else "http"


def qemu_json(url):
    """The `json:` filename that opens the image behind a link in QEMU and qemu-img."""
    options = {"driver": "qcow2",
               "file": {"driver": _curl_driver(url), "url": url, "timeout": QEMU_TIMEOUT,
                        "readahead": QEMU_READAHEAD}}
    return "json:" + json.dumps(options, separators=(",", ":"))


def qemu_drive(url):
    """The same options as a `-drive` string, with a throw-away overlay for the guest's writes."""
    # QemuOpts splits on commas; a doubled comma is a literal one.
    return ",".join(["driver=qcow2", f"file.driver={_curl_driver(url)}",
                     "file.url=" + url.replace(",", ",,"), f"file.timeout={QEMU_TIMEOUT}",
                     f"file.readahead={QEMU_READAHEAD}", "if=virtio", "snapshot=on"])


def qemu_fields(url):
    """Ready command lines for a link, as the links answer gives them."""
    filename = qemu_json(url)
    return {"qemu_json": filename,
            # -m 1: one request in flight, so QEMU 7.2 never has two finish in one wake-up,
            # which is how it loses one and waits for ever (docs/downloads.md).
            "qemu_img_args": ["convert", "-m", "1", "-f", "qcow2", filename],
            "qemu_args": ["-drive", qemu_drive(url)]}
