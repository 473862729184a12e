"""Who may see or change an image: its owner outside namespaces, else its namespace's rules.

A user who may not see an image gets the same 404 as for an id that names nothing, so
that ids do not tell whether an image exists.
"""

from errors import not_found
from namespaces import can_read, can_write
from queries import find_image


def readable_image(user, image_id):
    """The image if user may see it, else the same 404 as for a missing id."""
    image = find_image(image_id)
    if image is None:
        raise not_found()
    if image.namespace_id is None:
        visible = image.user_id == user.id
    else:
        visible = can_read(user, image.namespace)
    if not visible:
        raise not_found()
    return image


def writable_image(user, image_id):
    """The image if user may delete it; 404 otherwise, also when user may only read it."""
    image = readable_image(user, image_id)
    if image.namespace_id is not None and not can_write(user, image.namespace):
        raise not_found()
    if image.namespace_id is None and image.user_id != user.id:
        raise not_found()
    return image


def public_image(image_id):
    """The image if anyone may read it without a token (its namespace's root is public),
    else the same 404 as for a missing id."""
    image = find_image(image_id)
    if image is None or image.namespace_id is None or image.namespace.root.visibility != "public":
        raise not_found()
    return image
