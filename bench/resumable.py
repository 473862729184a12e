"""The resumable-upload measurement of bench/run.py: one file sent as a tus upload in pieces
(POST /uploads, then a PATCH per piece) against the same file in a single POST /images.

Both go through the same client, a connection of its own per request with the body sent by
sendfile(2) straight from the file, so the client costs the same little CPU either way, and
both times run to the answer that the image is stored (inspection included).
"""

import base64
import http.client
import json
import time
from urllib.parse import urlsplit

TUS = {"Tus-Resumable": "1.0.0"}


def send(port, method, target, headers, path=None, offset=0, count=0):
    """One request on a new connection, its body bytes offset.. of the file at path;
    (status, headers with lowercase names, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(count)}.items():
            connection.putheader(name, value)
        connection.endheaders()
        if count:
            with open(path, "rb") as file:
                connection.sock.sendfile(file, offset, count)
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def _expect(status, wanted, what, body=b""):
    if status != wanted:
        raise RuntimeError(f"{what}: HTTP {status} {body[:200]!r}")


def single_post(port, auth, path, name):
    """POST /images of the whole file; (seconds, image id)."""
    size = path.stat().st_size
    start = time.perf_counter()
    status, _, body = send(port, "POST", f"/images?name={name}", auth, path, 0, size)
    seconds = time.perf_counter() - start
    _expect(status, 201, "POST /images", body)
    return seconds, json.loads(body)["id"]


def tus_upload(port, auth, path, name, piece):
    """POST /uploads, then the file in PATCHes of piece bytes; (seconds, image id)."""
    size = path.stat().st_size
    headers = {**auth, **TUS}
    metadata = "name " + base64.b64encode(name.encode()).decode()
    start = time.perf_counter()
    status, answer, body = send(port, "POST", "/uploads", {
        **headers, "Upload-Length": str(size), "Upload-Metadata": metadata})
    _expect(status, 201, "POST /uploads", body)
    target = urlsplit(answer["location"]).path
    for offset in range(0, size, piece):
        status, answer, body = send(port, "PATCH", target, {
            **headers, "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream"},
            path, offset, min(piece, size - offset))
        _expect(status, 204, f"PATCH at {offset}", body)
    seconds = time.perf_counter() - start
    return seconds, int(answer["image-location"].rsplit("/", 1)[1])


def remove(port, auth, image_id):
    status, _, body = send(port, "DELETE", f"/images/{image_id}", auth)
    _expect(status, 204, "DELETE /images", body)
