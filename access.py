"""Who may see or change an image or list a namespace: its owner outside namespaces, else
its namespace's rules (namespaces.may_read); user None is a request without a token.

A user who may not see an image gets the same 404 as for an id that names nothing, so
that ids do not tell whether an image exists; a request without a token gets the same 401
for everything that is not public, existing or not, for the same reason.
"""

import queries
from errors import ValidationError, not_found, unauthorized
from image_changes import NAME
from namespaces import can_read, can_write, may_read, namespace_access, parse_namespace_ref
from queries import find_image

NAME_FILTER = "Name filter must be an image name: 1 to 64 of a-z, A-Z, 0-9, _ and -"


def _hidden(user):
    """What a caller is told of something they may not see: 404, or 401 without a token."""
    return not_found() if user is not None else unauthorized()


def may_see(user, image):
    """Whether user (None: no token) may read image: outside namespaces its owner alone,
    in one whoever may read the namespace."""
    if image.namespace_id is None:
        return user is not None and image.user_id == user.id
    return can_read(user, image.namespace)


def readable_image(user, image_id):
    """The image if user may see it; else the same 404 as for a missing id (401 without a
    token)."""
    image = find_image(image_id)
    if image is None or not may_see(user, image):
        raise _hidden(user)
    return image


def may_change(user, image):
    """Whether user (who has a token) may delete image: outside namespaces its owner
    alone, in one the owner or a collaborator of its root. Whoever may change an image may
    also see it, so this one check (one query in a namespace) decides both."""
    if image.namespace_id is None:
        return image.user_id == user.id
    return can_write(user, image.namespace)


def writable_image(user, image_id):
    """The image if user may delete it; 404 otherwise, also when user may only read it."""
    image = find_image(image_id)
    if image is None or not may_change(user, image):
        raise not_found()
    return image


def public_image(image_id):
    """The image if anyone may read it without a token (its namespace's root is public),
    else the same 404 as for a missing id."""
    image = find_image(image_id)
    if image is None or not may_see(None, image):
        raise not_found()
    return image


def readable_namespace(user, username, path):
    """The NamespaceAccess of /n/username/path if user may read it; else 404, or 401
    without a token, the same whether it exists or not (a path that no namespace can
    have included)."""
    try:
        ref = parse_namespace_ref(f"{path}@{username}")
    except ValidationError:
        found = None
    else:
        found = namespace_access(user, ref)
    if found is None or not may_read(user, found.visibility, lambda: found.writer):
        raise _hidden(user)
    return found


def namespace_page(user, username, path, search, page):
    """GET /n/username/path/-/images: (rows, has_next) of that namespace's images, not its
    children's, for whoever may read the namespace."""
    found = readable_namespace(user, username, path)
    return queries.list_namespace_images(found.id, search, page)


def list_page(user, search, page, name=None, namespace=None):
    """GET /images: (rows, has_next) of what user may list (queries.list_images), narrowed
    by the exact filters. name: that image name. namespace: `path[@owner]`, the user's
    own without @owner; "" for images outside namespaces.

    The filters only narrow the list, never widen it: a namespace that does not exist,
    and one that user does not own or collaborate on (even a public one), give an empty
    page alike, which tells nothing of what exists. Text that cannot be a name or a
    namespace is a 400 on its field.
    """
    if name is not None and not NAME.fullmatch(name):
        raise ValidationError("name", NAME_FILTER)
    if namespace is None:
        return queries.list_images(user, search, page, name)
    if namespace == "":
        return queries.list_images(user, search, page, name, outside_namespaces=True)
    found = namespace_access(user, parse_namespace_ref(namespace))
    if found is None or not found.writer:  # listed: what user owns or collaborates on
        return [], False
    return queries.list_namespace_images(found.id, search, page, name)
