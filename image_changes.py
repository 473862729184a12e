"""Adding and removing images: the checks before an upload is read, then file and row together.

The file and its row are changed in the order that leaves a crash at worst a file without
a row (never a row without a file), under an intent on the key, so that recovery.py can
finish the change in the next process that starts.
"""

import logging
import re
from dataclasses import dataclass

from peewee import IntegrityError

import image_stats
from errors import ValidationError
from models import Image, Namespace, User, write_transaction
from namespaces import NamespaceRef, ensure_namespace, parse_namespace_ref, resolve_upload_target
from queries import find_image
from quotas import check_quota_at_record
from storage import StorageUnavailable
from webhooks import emit

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


def create_image(plan, storage, staged, size, sha256, info, base_url=None, put=None,
                 record=None):
    """Move the inspected file into the store, then record it; a failure removes the file.

    The `created` webhook event is queued in the row's transaction (base_url: that of the
    image's `url`; see _emit). The database settles a race on the name: the loser's
    unique-index error becomes the same 400 (record_image), and its file is removed
    (store_file).

    put(staged) stores the file instead of storage.put (a finished tus upload stores its
    own); record(image), if given, runs in the row's transaction, before its quotas are
    checked (it marks the upload done, so that the upload and its image do not both count).
    """
    columns = {"size": size, "virtual_size": info.virtual_size, "sha256": sha256}
    image = store_file(storage, staged,
                       lambda key: record_image(plan, {"storage_key": key, **columns},
                                                then=record, base_url=base_url),
                       put=put)
    return find_image(image.id)


def store_file(storage, staged, record, put=None):
    """Move a staged file into the store (put(staged), by default storage.put), then
    record(key) writes what names it; return what record returned. A failure of either
    removes the file.

    The file goes in first so that a crash leaves at worst a file without a row, never a
    row without a file; put() leaves an intent on the key until the row is committed, so
    that recovery.recover() finds such a file after a crash.
    """
    key = (put or storage.put)(staged)
    try:
        result = record(key)
    except BaseException:
        _remove_file(storage, key)
        raise
    storage.intents.settle(key)
    return result


def record_image(plan, columns, then=None, base_url=None):
    """Write the planned image's row with columns (and a missing namespace of the user's
    own) in one transaction, then(image), the quotas' check (403) and its `created` event
    inside it too; a name taken meanwhile is the 400."""
    try:
        with write_transaction():
            namespace = plan.namespace
            if plan.ref and namespace is None:
                namespace = ensure_namespace(plan.owner, plan.ref.segments)
            image = Image.create(author=plan.author, user=plan.owner, namespace=namespace,
                                 name=plan.name, **columns)
            if then is not None:
                then(image)
            # In this transaction, so that two racing uploads cannot both pass a quota; after
            # then(), which may end what counted as pending (a tus upload marked done), and
            # with the new row left out, so that the image counts once, by its size.
            check_quota_at_record(plan.owner, namespace, columns.get("size"),
                                  except_image=image.id)
            if columns.get("storage_key") is not None:  # an import counts once it has its file
                image_stats.change(1, columns["size"])
            _emit("created", image, base_url)
    except IntegrityError:
        raise ValidationError("name", NAME_TAKEN) from None
    return image


def _remove_file(storage, key):
    """Remove key's file, then its intent (kept if the store fails, for the next recovery)."""
    storage.delete(key)
    storage.intents.settle(key)


def _emit(action, image, base_url):
    """Queue the webhook event of a change, inside its transaction. Every caller that
    serves the API passes base_url; without one no event can be made, and that is logged."""
    if base_url is None:
        log.warning("image %s %s without a base URL: no webhook event", image.id, action)
        return
    emit(action, image, base_url)


def _delete_fileless(image, base_url):
    """Delete the row of an import that has no file; None once it is gone, or the image
    read again when its import stored the file meanwhile (then it is deleted with it)."""
    with write_transaction():
        deleted = Image.delete().where(Image.id == image.id,
                                       Image.storage_key.is_null()).execute()
        if deleted:
            _emit("deleted", image, base_url)
    return None if deleted else Image.get_or_none(Image.id == image.id)


def delete_image(image, storage, base_url=None):
    """Remove the row, then the file once the row is surely gone (under an intent, so
    that a crash between the two leaves nothing that recovery.recover() does not remove).
    The `deleted` webhook event, showing the image as it was, is queued with the delete.

    Once the row is gone the image is gone: a store that fails to remove the file keeps
    the intent, and the file is removed by the next recovery or `flask sweep`, not an
    error for the client.
    """
    if image.storage_key is None and (image := _delete_fileless(image, base_url)) is None:
        return
    storage.intents.intend(image.storage_key)
    try:
        with write_transaction():
            _emit("deleted", image, base_url)
            # The size the row has now (an import may have filled it in since it was read);
            # nothing when another delete took the row first. (RETURNING: SQLite 3.35 and
            # later, docs/observability.md.)
            for (size,) in Image.delete().where(Image.id == image.id).returning(
                    Image.size).tuples().execute():
                if size is not None:
                    image_stats.change(-1, -size)
    except BaseException:
        storage.intents.settle(image.storage_key)  # the row is still there, and so is the file
        raise
    try:
        _remove_file(storage, image.storage_key)
    except StorageUnavailable as error:
        log.warning("image %s deleted, its file left for the sweep: %s", image.id, error)
