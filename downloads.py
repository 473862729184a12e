"""Serving an image file like a static file server: types, ranges, conditions, sendfile."""

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import http_date, is_resource_modified, parse_accept_header
from werkzeug.wrappers import Response
from werkzeug.wsgi import wrap_file

from errors import ApiError

JSON = "application/json"
DISK_TYPES = ("application/x-qemu-disk", "application/octet-stream")


def negotiate(accept_header):
    """Pick JSON or a disk type from an Accept header; None when it allows neither.

    No header, or */*, means JSON: it is listed first, and werkzeug keeps the
    server's order among equally good matches.
    """
    if not accept_header or not accept_header.strip():
        return JSON
    accept = parse_accept_header(accept_header, MIMEAccept)
    return accept.best_match((JSON, *DISK_TYPES))


def _byte_range(request, size, etag, last_modified):
    """The (start, end) that a Range header asks for, None for the whole file.

    Raises 416 for a range past the end. A malformed Range, several ranges, or a
    stale If-Range mean the whole file, as RFC 9110 allows.
    """
    if "Range" not in request.headers:
        return None
    if_range = request.if_range
    if if_range.etag is not None and if_range.etag != etag:
        return None
    if if_range.date is not None and if_range.date != last_modified:
        return None
    parsed = request.range
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return None
    span = parsed.range_for_length(size)
    if span is None:
        raise ApiError(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
    return span


def file_response(request, opener, *, size, mimetype, etag, last_modified, filename):
    """Answer GET/HEAD with the file, through the server's file_wrapper (sendfile).

    opener() opens the file only when bytes will really be sent. A range is sent
    zero-copy too: the file is positioned at its start and Content-Length set to
    its length, which is exactly what gunicorn's sendfile path reads.
    """
    headers = {
        "ETag": f'"{etag}"',
        "Last-Modified": http_date(last_modified),
        "Accept-Ranges": "bytes",
        "Vary": "Accept",
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    if request.if_match and not request.if_match.contains(etag):
        raise ApiError(412, "Precondition Failed", headers)
    if not is_resource_modified(request.environ, etag=etag, last_modified=last_modified,
                                ignore_if_range=True):
        return Response(status=304, headers=headers)
    status, start, end = 200, 0, size
    span = _byte_range(request, size, etag, last_modified)
    if span is not None:
        status, (start, end) = 206, span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        body = []
    else:
        f = opener()
        f.seek(start)
        body = wrap_file(request.environ, f)
    response = Response(body, status, headers=headers, mimetype=mimetype, direct_passthrough=True)
    response.content_length = end - start
    return response
