"""Adding and removing images: the checks before an upload is read, then file and row together.

The file and its row are changed in the order that leaves a crash at worst a file without
a row (never a row without a file), under an intent on the key, so that recovery.py can
finish the change in the next process that starts.
"""

import logging
import re
from dataclasses import dataclass

from peewee import IntegrityError

from errors import ValidationError
from models import Image, Namespace, User, write_transaction
from namespaces import NamespaceRef, ensure_namespace, parse_namespace_ref, resolve_upload_target
from queries import find_image
from storage import StorageUnavailable

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
NAME_TAKEN = "Name already exists"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadPlan:
    """Where an upload goes, checked before its body is read.

    ref is the namespace the client named (None outside namespaces); namespace is its row,
    None also when the namespace is still to be created (create_image makes it).
    """

    author: User
    owner: User
    namespace: Namespace | None
    ref: NamespaceRef | None
    name: str


def plan_upload(user, name, namespace_text):
    """Check name and namespace before the body is read; return what create_image needs."""
    if not name:
        raise ValidationError("name", "Name field required")
    if not NAME.fullmatch(name):
        raise ValidationError("name", "Name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
    ref = parse_namespace_ref(namespace_text) if namespace_text else None
    owner, namespace = resolve_upload_target(user, ref) if ref else (user, None)
    if _name_taken(owner, ref, namespace, name):
        raise ValidationError("name", NAME_TAKEN)
    return UploadPlan(author=user, owner=owner, namespace=namespace, ref=ref, name=name)


def _name_taken(owner, ref, namespace, name):
    """Whether name is used where the upload goes: the namespace, or the owner's images
    outside namespaces. A namespace that is still to be created holds no image yet."""
    if ref is not None:
        return namespace is not None and Image.select().where(
            Image.namespace == namespace.id, Image.name == name).exists()
    return Image.select().where(Image.user == owner.id, Image.namespace.is_null(),
                                Image.name == name).exists()


def create_image(plan, storage, staged, size, sha256, info, put=None, record=None):
    """Move the inspected file into the store, then record it; a failure removes the file.

    The file goes in first so that a crash leaves at worst a file without a row, never a
    row without a file; put() leaves an intent on the key until the row is committed, so
    that recovery.recover() finds such a file after a crash. The database settles a race
    on the name: the loser's unique-index error becomes the same 400.

    put(staged) stores the file instead of storage.put (a finished tus upload stores its
    own); record(image), if given, runs in the row's transaction (it marks the upload done).
    """
    key = (put or storage.put)(staged)
    try:
        with write_transaction():
            namespace = plan.namespace
            if plan.ref and namespace is None:
                namespace = ensure_namespace(plan.owner, plan.ref.segments)
            image = Image.create(author=plan.author, user=plan.owner, namespace=namespace,
                                 name=plan.name, storage_key=key, size=size,
                                 virtual_size=info.virtual_size, sha256=sha256)
            if record is not None:
                record(image)
    except IntegrityError:
        _remove_file(storage, key)
        raise ValidationError("name", NAME_TAKEN) from None
    except BaseException:
        _remove_file(storage, key)
        raise
    storage.intents.settle(key)
    return find_image(image.id)


def _remove_file(storage, key):
    """Remove key's file, then its intent (kept if the store fails, for the next recovery)."""
    storage.delete(key)
    storage.intents.settle(key)


def delete_image(image, storage):
    """Remove the row, then the file once the row is surely gone (under an intent, so
    that a crash between the two leaves nothing that recovery.recover() does not remove).

    Once the row is gone the image is gone: a store that fails to remove the file keeps
    the intent, and the file is removed by the next recovery or `flask sweep`, not an
    error for the client.
    """
    storage.intents.intend(image.storage_key)
    try:
        with write_transaction():
            Image.delete().where(Image.id == image.id).execute()
    except BaseException:
        storage.intents.settle(image.storage_key)  # the row is still there, and so is the file
        raise
    try:
        _remove_file(storage, image.storage_key)
    except StorageUnavailable as error:
        log.warning("image %s deleted, its file left for the sweep: %s", image.id, error)
