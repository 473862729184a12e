"""Small HTTP helpers: the public base URL and the pagination Link header."""

from urllib.parse import urlencode

from flask import current_app, request


def base_url():
    """PUBLIC_URL when configured, else the request's own scheme and host."""
    return current_app.config["PUBLIC_URL"] or request.host_url.rstrip("/")


def link_header(url, args, page, has_next):
    """RFC 8288 prev/next links that keep the other query parameters; None when neither."""
    kept = [(k, v) for k, v in args if k != "page"]

    def link(number, rel):
        return f'<{url}?{urlencode([("page", number), *kept])}>; rel="{rel}"'

    links = []
    if page > 1:
        links.append(link(page - 1, "prev"))
    if has_next:
        links.append(link(page + 1, "next"))
    return ", ".join(links) or None
