"""The JSON the API answers with: users, namespaces and images, and its times (RFC 3339)."""

from datetime import UTC


def rfc3339(moment):
    """2006-01-02T15:04:05Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def last_modified(image):
    """The image's creation time as an aware datetime, for HTTP dates."""
    return image.created_at.replace(tzinfo=UTC)


def user_json(user):
    """The user object of the API."""
    return {"id": user.id, "email": user.email, "username": user.username,
            "created_at": rfc3339(user.created_at)}


def namespace_json(ns, base_url):
    """The namespace object of the API; expects the namespace's user loaded with it."""
    return {"id": ns.id, "user_id": ns.user_id, "root_id": ns.root_id, "parent_id": ns.parent_id,
            "name": ns.name, "path": ns.path, "description": ns.description,
            "visibility": ns.visibility, "created_at": rfc3339(ns.created_at),
            "url": f"{base_url}/n/{ns.user.username}/{ns.path}", "user": user_json(ns.user)}


def image_json(image, base_url):
    """The image object of the API; expects author, user and namespace loaded with it."""
    ns = image.namespace
    return {"id": image.id, "author_id": image.author_id, "user_id": image.user_id,
            "namespace_id": image.namespace_id, "name": image.name,
            "created_at": rfc3339(image.created_at), "url": f"{base_url}/images/{image.id}",
            "author": user_json(image.author), "user": user_json(image.user),
            "namespace": namespace_json(ns, base_url) if ns else None,
            "size": image.size, "virtual_size": image.virtual_size, "sha256": image.sha256}
