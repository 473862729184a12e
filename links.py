"""Signed download links: a URL that serves one image to whoever holds it, until it expires."""

import hashlib
import re
import time
from datetime import UTC, datetime

from itsdangerous import BadSignature, URLSafeSerializer

from errors import ApiError, ValidationError

DEFAULT_EXPIRES_IN = 3600
MAX_EXPIRES_IN = 7 * 24 * 3600


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
