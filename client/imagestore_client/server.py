"""Talking to the server: one requests session, the token sent to the server alone, every
failure turned into a ClientError, pages followed by their Link header, images found by id
or by exact name."""

import re
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from imagestore_client import __version__
from imagestore_client.errors import NetworkError, NotFoundError, ServerError, UsageError

DISK = "application/x-qemu-disk"
TIMEOUT = (10, 60)  # seconds to connect, and to wait for each read
BLOCKSIZE = 1 << 20
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ID = re.compile(r"[0-9]{1,18}")
# What a broken or stalled connection raises, before or during a body.
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Broken(NetworkError):
    """The connection failed or broke: worth another try, from where the server stands."""


class BlockAdapter(HTTPAdapter):
    """Sends file bodies in 1 MiB reads rather than urllib3's 16 KiB."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["blocksize"] = BLOCKSIZE
        super().init_poolmanager(*args, **kwargs)


def cause(error):
    """The innermost reason of a requests error, in words ('Connection refused')."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException) and error.args \
                and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        error = inner or error.__cause__ or error.__context__
    for candidate in reversed(seen):
        if getattr(candidate, "strerror", None):
            return candidate.strerror
    return str(seen[-1]) or type(seen[-1]).__name__


def broken(url, error):
    """A Broken error that names the server and the cause."""
    address = urlsplit(url)
    return Broken(f"{address.scheme}://{address.netloc}: {cause(error)}")


def error_of(response, token):
    """The ServerError of an answer; a 401 without a token says how to give one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = ServerError(response.status_code, body, response.reason)
    if response.status_code == 401 and not token:
        error.args = (f"{error} (no token: set IMAGESTORE_TOKEN, or token in the config file)",)
    return error


def json_of(response):
    """The JSON body of an answer; an error naming the status when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        raise ServerError(response.status_code, {"message": "the answer is not JSON"},
                          response.reason) from None


class Server:
    """The configured server: requests to it carry the token; to anyone else they do not."""

    def __init__(self, config):
        self.base = config.url
        self.origin = urlsplit(config.url)[:2]
        self.token = config.token
        self.session = requests.Session()
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, BlockAdapter())
        self.session.headers["User-Agent"] = f"imagestore-client/{__version__}"

    def url(self, target):
        """An absolute URL: a path is taken from the configured base URL."""
        return target if "://" in target else self.base + target

    def send(self, method, target, expect=(200,), headers=None, timeout=TIMEOUT, **options):
        """One request; the answer if its status is expected, else ServerError; Broken
        when no answer came."""
        url = self.url(target)
        headers = dict(headers or {})
        if self.token and urlsplit(url)[:2] == self.origin:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self.session.request(method, url, headers=headers, timeout=timeout,
                                            **options)
        except TRANSIENT as error:
            raise broken(url, error) from None
        except requests.RequestException as error:  # a URL requests cannot use, and the like
            raise NetworkError(f"{url}: {cause(error)}") from None
        if response.status_code not in expect:
            raise error_of(response, self.token)
        return response

    def json(self, method, target, expect=(200,), **options):
        """The JSON of an answer."""
        return json_of(self.send(method, target, expect, **options))

    def pages(self, target, params=None):
        """Every item of a list, page after page, following the Link header's next."""
        url = self.url(target)
        while url:
            response = self.send("GET", url, params=params)
            yield from json_of(response)
            url, params = response.links.get("next", {}).get("url"), None


def in_namespace(image, namespace):
    """Whether an image is in namespace (path or path@owner; None: outside namespaces)."""
    found = image.get("namespace")
    if not namespace:
        return found is None
    path, _, owner = namespace.partition("@")
    return found is not None and found.get("path") == path and (
        not owner or (found.get("user") or {}).get("username") == owner)


def where(namespace):
    return f"in namespace {namespace}" if namespace else "outside namespaces"


def find_image(server, ref, namespace=None):
    """The image object of an id, or of a name in a namespace (exact, as GET /images filters
    it; checked here too, so that a server without the filters cannot hand back another)."""
    if ID.fullmatch(ref):
        return server.json("GET", f"/images/{ref}")
    if not NAME.fullmatch(ref):
        raise UsageError(f"not an image name or id: {ref!r}")
    params = {"name": ref, "namespace": namespace or ""}
    for image in server.pages("/images", params):
        if image.get("name") == ref and in_namespace(image, namespace):
            return image
    raise NotFoundError(f"no image named {ref} {where(namespace)}")
