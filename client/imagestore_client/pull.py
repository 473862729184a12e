"""pull: an image into a content-addressed cache, CACHE/sha256/<hex>.qcow2.

A file there was checked against its sha256 before it was moved in, and is never changed
after. A download in progress is CACHE/partial/<hex>.part; a broken one goes on with Range
and If-Range (the ETag is the sha256), in this run or the next. Processes pulling one image
at once take CACHE/locks/<hex>.lock (flock) in turn: the first downloads, the others find
the file and only revalidate it (If-None-Match: 304, no bytes), which marks the file
used (cache.py), for `imagestore prune`.
"""

import hashlib
import os
import re
from urllib.parse import urljoin

from imagestore_client.errors import ClientError, IntegrityError
from imagestore_client.progress import Progress
from imagestore_client.retry import Retries
from imagestore_client.server import DISK, TRANSIENT, Broken, broken, find_image

SHA256 = re.compile(r"[0-9a-f]{64}")
PIECE = 1 << 20  # bytes read from the answer at a time; a break loses at most this much
REDIRECTS = (301, 302, 303, 307, 308)


class PartialFile:
    """The bytes of one download so far, hashed as they are written."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a+b")  # noqa: SIM115 - closed by finish() or discard()
        self.file.seek(0)
        self.digest = hashlib.sha256()
        for block in iter(lambda: self.file.read(PIECE), b""):
            self.digest.update(block)
        self.size = self.file.tell()

    def restart(self):
        """Start again from the first byte."""
        self.file.truncate(0)
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data):
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def discard(self):
        self.file.close()
        self.path.unlink(missing_ok=True)

    def install(self, target):
        """Move the finished file into place, read-only, durably."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, 0o444)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def image_sha256(server, image):
    """The image's sha256, which names its file in the cache."""
    sha256 = image.get("sha256")
    if sha256 is None:  # an import from a URL not finished: the server says why
        server.send("GET", f"/images/{image['id']}", headers={"Accept": DISK}, stream=True).close()
        raise ClientError(f"image {image['id']} has no file yet")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise IntegrityError(f"the server gave image {image['id']} a bad sha256: {sha256!r}")
    return sha256


def revalidate(server, image, sha256):
    """Whether the server confirms the cached file with no bytes: 304, or (a store that
    redirects downloads) a redirect, which the server sends only to someone who may read it."""
    response = server.send("GET", f"/images/{image['id']}", expect=(200, 206, 304, *REDIRECTS),
                           headers={"Accept": DISK, "If-None-Match": f'"{sha256}"'},
                           stream=True, allow_redirects=False)
    response.close()  # unread: a 200 here would be a changed file, downloaded anew
    return response.status_code != 200


def open_download(server, image, sha256, have):
    """The file's answer from byte `have` on (Range + If-Range), redirects followed by hand:
    a storage behind a redirect has other ETags, so it gets the Range alone."""
    headers = {"Accept": DISK}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": f'"{sha256}"'})
    response = server.send("GET", f"/images/{image['id']}", expect=(200, 206, *REDIRECTS),
                           headers=headers, stream=True, allow_redirects=False)
    for _ in range(5):
        if response.status_code not in REDIRECTS:
            return response
        response.close()
        headers.pop("If-Range", None)
        location = urljoin(response.url, response.headers.get("Location", ""))
        response = server.send("GET", location, expect=(200, 206, *REDIRECTS), headers=headers,
                               stream=True, allow_redirects=False)
    raise ClientError(f"too many redirects for image {image['id']}")


def range_start(response):
    """The first byte of a 206 answer, from Content-Range: bytes START-END/SIZE."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def fetch_once(server, image, sha256, partial, progress):
    """One request: append what it brings to partial; Broken when the connection breaks."""
    with open_download(server, image, sha256, partial.size) as response:
        if response.status_code == 200:  # the whole file (If-Range did not hold)
            partial.restart()
        elif range_start(response) != partial.size:
            raise ClientError(f"the server sent the wrong range of image {image['id']}")
        progress.rewind(partial.size)
        try:
            for block in response.iter_content(PIECE):
                if partial.size + len(block) > image["size"]:
                    partial.discard()
                    raise IntegrityError(f"the server sent more than image {image['id']}'s "
                                         f"{image['size']} bytes")
                partial.write(block)
                progress.advance(len(block))
        except TRANSIENT as error:
            raise broken(response.url, error) from None


def download(server, image, sha256, partial, retries, quiet):
    """Bring partial to the image's size, trying again after each break."""
    with Progress("pulled", image["size"], partial.size, quiet) as progress:
        attempts = Retries(retries, progress)
        while partial.size < image["size"]:
            before = partial.size
            try:
                fetch_once(server, image, sha256, partial, progress)
            except Broken as error:
                if partial.size > before:
                    attempts.ok()
                partial.file.flush()
                attempts.failed(error)
    got = partial.digest.hexdigest()
    if got != sha256:
        partial.discard()
        raise IntegrityError(f"the download of image {image['id']} does not match its sha256 "
                             f"(expected {sha256}, got {got}); nothing was cached")


def pull(server, ref, namespace, cache, retries=8, quiet=False):
    """The cached file of an image (found by id, or name in namespace), downloaded if new."""
    image = find_image(server, ref, namespace)
    sha256 = image_sha256(server, image)
    target = cache.path(sha256)
    with cache.locked(sha256):
        if target.exists() and revalidate(server, image, sha256):
            cache.mark_used(sha256)
            return target
        partial = PartialFile(cache.partial(sha256))
        try:
            download(server, image, sha256, partial, retries, quiet)
        except BaseException:
            partial.file.close()
            raise
        partial.install(target)  # just written: its modification time is its last use
    return target
