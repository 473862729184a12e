"""The JSON the API answers with: users, namespaces and images, and its times (RFC 3339).

An image object is built from one flat row of plain values (IMAGE_ROW), which the list
page reads straight from its query and a single image takes from its model objects
(image_row): one way to build it, whichever way it was read.
"""

from datetime import UTC, datetime

# The values an image object is made of, in the order of a row: the image's own columns
# (its import's last: all None for an uploaded image), then "relation.column" of its
# author, its user, its namespace (all None without one) and the namespace's user.
IMAGE_ROW = (
    "id", "author_id", "user_id", "namespace_id", "name", "created_at", "size",
    "virtual_size", "sha256",
    "download_source", "download_error", "download_created_at", "download_started_at",
    "download_finished_at",
    "author.email", "author.username", "author.created_at",
    "user.email", "user.username", "user.created_at",
    "namespace.user_id", "namespace.root_id", "namespace.parent_id", "namespace.name",
    "namespace.path", "namespace.description", "namespace.visibility", "namespace.created_at",
    "namespace.user.email", "namespace.user.username", "namespace.user.created_at",
)


# Every image is a QEMU disk; Djinn's image object names the driver that boots it.
DRIVER = "qemu"


def rfc3339(moment):
    """2006-01-02T15:04:05Z, of a datetime or of SQLite's text of one."""
    if isinstance(moment, str):
        # What SQLite holds for the database's naive UTC whole seconds, rearranged rather
        # than parsed and formatted again (the list page reads it so: compiled.rows).
        if len(moment) == 19 and moment[10] == " " and moment[0] != "0":
            return f"{moment[:10]}T{moment[11:]}Z"
        moment = datetime.fromisoformat(moment)
    # isoformat takes a third of strftime's time (a list page formats some 40 times) and
    # writes the same for what the database holds: naive UTC, whole seconds, 4-digit years.
    if moment.microsecond or moment.tzinfo is not None or moment.year < 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.isoformat() + "Z"


def _rfc3339_or_none(moment):
    return None if moment is None else rfc3339(moment)


def download_json(source, error, created_at, started_at, finished_at):
    """The `download` object of an image imported from a URL; None for an uploaded one
    (which has no download_created_at)."""
    if created_at is None:
        return None
    return {"source": source, "error": error, "created_at": rfc3339(created_at),
            "started_at": _rfc3339_or_none(started_at),
            "finished_at": _rfc3339_or_none(finished_at)}


def last_modified(image):
    """The image's creation time as an aware datetime, for HTTP dates."""
    return image.created_at.replace(tzinfo=UTC)


def image_row(image):
    """The IMAGE_ROW values of an image model loaded with its relations."""
    values = []
    for name in IMAGE_ROW:
        value = image
        for attr in name.split("."):
            value = getattr(value, attr)
            if value is None:  # no namespace: its columns are all None, as in a LEFT JOIN
                break
        values.append(value)
    return values


class _Objects:
    """The image objects of one answer. A page's images share a few users and namespaces:
    each is built once, and the images hold the same (read-only) dict."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.users = {}
        self.namespaces = {}

    def user(self, user_id, email, username, created_at):
        """The user object of the API."""
        user = self.users.get(user_id)
        if user is None:
            user = self.users[user_id] = {"id": user_id, "email": email, "username": username,
                                          "created_at": rfc3339(created_at)}
        return user

    def namespace(self, ns_id, user_id, root_id, parent_id, name, path, description,
                  visibility, created_at, owner_email, owner_username, owner_created_at):
        """The namespace object of the API, with its user."""
        ns = self.namespaces.get(ns_id)
        if ns is None:
            ns = self.namespaces[ns_id] = {
                "id": ns_id, "user_id": user_id, "root_id": root_id, "parent_id": parent_id,
                "name": name, "path": path, "description": description,
                "visibility": visibility, "created_at": rfc3339(created_at),
                "url": f"{self.base_url}/n/{owner_username}/{path}",
                "images_url": f"{self.base_url}/n/{owner_username}/{path}/-/images",
                "user": self.user(user_id, owner_email, owner_username, owner_created_at)}
        return ns

    def image(self, row):
        """The image object of the API from a row of IMAGE_ROW values."""
        (image_id, author_id, user_id, namespace_id, name, created_at, size, virtual_size,
         sha256) = row[:9]
        # The slices follow IMAGE_ROW: the import (9:14; its created_at, 11, None for an
        # upload), author, user, namespace (20:). A page's rows share a few users and
        # namespaces: looked up before a slice is taken (a third of images_json's time).
        users, namespaces = self.users, self.namespaces
        author = users.get(author_id) or self.user(author_id, *row[14:17])
        owner = users.get(user_id) or self.user(user_id, *row[17:20])
        namespace = (None if namespace_id is None else namespaces.get(namespace_id)
                     or self.namespace(namespace_id, *row[20:]))
        return {"id": image_id, "author_id": author_id, "user_id": user_id,
                "namespace_id": namespace_id, "name": name, "created_at": rfc3339(created_at),
                "url": f"{self.base_url}/images/{image_id}",
                "author": author, "user": owner, "namespace": namespace,
                "size": size, "virtual_size": virtual_size, "sha256": sha256,
                "driver": DRIVER,
                "download": None if row[11] is None else download_json(*row[9:14])}


def images_json(rows, base_url):
    """The image objects of rows of IMAGE_ROW values (a list page's)."""
    objects = _Objects(base_url)
    return [objects.image(row) for row in rows]


def image_json(image, base_url):
    """The image object of the API; expects author, user and namespace loaded with it."""
    return _Objects(base_url).image(image_row(image))
