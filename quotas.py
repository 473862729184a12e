"""Quotas: limits on the bytes and images of a user, or of a root namespace and all below it.

An upload is checked against its owner's quota and, in a namespace, its root's (docs/api.md,
"Quotas"): early, from the length declared before any body byte is read
(check_quota_early), and again in the transaction that writes the image's row
(check_quota_at_record), with the quotas' rows locked, so that of two racing uploads that
together pass a quota one is refused. A user's quota counts every image the user owns
(user_id), in namespaces or not; a namespace's counts every image of its root's tree; both
count what is on its way in (pending_usage): imports, and tus uploads from their creation,
whose row is written under the same locks (tusuploads.create_upload).
"""

from dataclasses import dataclass

from peewee import SQL, fn

from errors import ApiError
from models import Image, Namespace, Quota, Upload, User, locking, utcnow
from namespaces import find_namespace


@dataclass(frozen=True)
class Usage:
    """Bytes and images counted against a quota."""

    bytes: int = 0
    images: int = 0

    def __add__(self, other):
        return Usage(self.bytes + other.bytes, self.images + other.images)


def target_label(target):
    """How messages name a User or a Namespace: 'user alice', 'namespace team@alice'."""
    if isinstance(target, User):
        return f"user {target.username}"
    return f"namespace {target.path}@{target.user.username}"


def quota_label(quota):
    """How messages name the quota: as its user or its namespace."""
    return target_label(quota.user if quota.user_id is not None else quota.namespace)


def _images_of(quota, except_image=None):
    """A query of the images that count against quota (but except_image, an id)."""
    if quota.user_id is not None:
        where = Image.user == quota.user_id
    else:
        tree = Namespace.select(Namespace.id).where(Namespace.root == quota.namespace_id)
        where = Image.namespace.in_(tree)
    if except_image is not None:
        where &= Image.id != except_image
    return Image.select().where(where)


def stored_usage(quota, except_image=None):
    """The bytes and number of the stored images under quota: one SUM and COUNT(*) read
    from the index on (user, size) or (namespace, size), the table untouched."""
    total, count = (_images_of(quota, except_image).where(Image.size.is_null(False))
                    .select(fn.COALESCE(fn.SUM(Image.size), 0), fn.COUNT(SQL("*")))
                    .scalar(as_tuple=True))
    return Usage(int(total), count)


def _uploads_of(quota):
    """A query of the tus uploads on their way in under quota: neither done nor expired."""
    if quota.user_id is not None:
        where = Upload.owner == quota.user_id
    else:
        where = Upload.root == quota.namespace_id
    return Upload.select().where(where, Upload.offset < Upload.length,
                                 Upload.expires_at > utcnow())


def pending_usage(quota, except_image=None):
    """What is on its way in under quota, and reserved for it: imports not finished (rows
    whose size is still NULL) count as images, with no bytes until their file is recorded,
    when the record-time check counts them; tus uploads neither done nor expired count as
    one image each, with the bytes of their Upload-Length (done, the image counts instead).
    """
    count = _images_of(quota, except_image).where(Image.size.is_null()).count()
    length, uploads = (_uploads_of(quota)
                       .select(fn.COALESCE(fn.SUM(Upload.length), 0), fn.COUNT(SQL("*")))
                       .scalar(as_tuple=True))
    return Usage(int(length), count + uploads)


def usage(quota, except_image=None):
    """Everything counted against quota: stored images and what is pending."""
    return stored_usage(quota, except_image) + pending_usage(quota, except_image)


def quotas_of(owner_id, root_id):
    """The quotas an image of owner_id in the tree of root_id (or None) is checked against,
    in the order of their ids (that order of locking keeps two uploads from deadlocking)."""
    where = Quota.user == owner_id
    if root_id is not None:
        where |= Quota.namespace == root_id
    return Quota.select().where(where).order_by(Quota.id)


def check_quotas(quotas, length, except_image=None):
    """Refuse (403) an image of length bytes (None: unknown, so at least one) that would
    take any of quotas past its limit of images or of bytes."""
    for quota in quotas:
        use = usage(quota, except_image)
        if quota.max_images is not None and use.images + 1 > quota.max_images:
            raise exceeded(quota, "images", quota.max_images, use.images)
        need = 1 if length is None else length
        if quota.max_bytes is not None and use.bytes + need > quota.max_bytes:
            raise exceeded(quota, "bytes", quota.max_bytes, use.bytes, length)


class QuotaExceeded(ApiError):
    """The 403 of a quota, told apart from a missing scope's (for metrics and the audit log):
    label names the quota, unit is "bytes" or "images"."""

    def __init__(self, message, label, unit):
        super().__init__(403, message)
        self.label, self.unit = label, unit


def exceeded(quota, unit, limit, used, length=None):
    """The 403 naming the quota, its limit and its use (and the image's bytes, if known)."""
    label = quota_label(quota)
    noun = unit if limit != 1 else unit.removesuffix("s")  # "1 image", "0 images"
    message = f"Quota exceeded: {label} may keep {limit} {noun}; {used} in use"
    if length is not None:
        message += f", and this image is {length} bytes"
    return QuotaExceeded(message, label, unit)


def plan_namespace(plan):
    """A namespace of the tree that plan's upload goes under (its own, or the root it will
    be made under), or None: outside namespaces, or under a root the upload will create."""
    if plan.ref is None:
        return None
    return plan.namespace or find_namespace(plan.owner, plan.ref.segments[0])


def plan_root_id(plan):
    """The id of the root namespace that plan's upload goes under, or None (as above)."""
    namespace = plan_namespace(plan)
    return namespace.root_id if namespace is not None else None


def check_quota_early(plan, length):
    """Before the body is read: refuse an upload (an image_changes.UploadPlan) of length
    bytes, as declared (Content-Length, Upload-Length; None when unknown), that would pass
    its owner's or its root namespace's quota."""
    check_quotas(quotas_of(plan.owner.id, plan_root_id(plan)), length)


def check_quota_at_record(owner, namespace, size, except_image=None):
    """Inside the write transaction that records an image of owner in namespace (None:
    outside namespaces) of size bytes (None: not known yet, an import): lock the quotas it
    is checked against, then count and refuse (403) as check_quota_early.

    Locked, the count cannot change under it before the commit: another upload's check
    waits for this transaction (SELECT … FOR UPDATE on PostgreSQL; SQLite's write
    transaction holds the database). except_image is the id of an image row that is
    counted by size instead: one being given its file (an import), already counted as
    pending, or the new row itself (image_changes.record_image).
    """
    root_id = namespace.root_id if namespace is not None else None
    check_quotas(list(locking(quotas_of(owner.id, root_id))), size, except_image)


# --- the admin commands' part ------------------------------------------------------------

def quota_for(target):
    """The quota row of target (a User or a root Namespace), or None."""
    if isinstance(target, User):
        return Quota.get_or_none(Quota.user == target.id)
    return Quota.get_or_none(Quota.namespace == target.id)


def new_quota(target):
    """An unsaved quota of target without limits (usage() counts for it all the same)."""
    return Quota(user=target) if isinstance(target, User) else Quota(namespace=target)


def set_quota(target, **limits):
    """Set the limits given (max_bytes, max_images; None lifts one) on target's quota,
    made when it has none; the others stay as they were. Return the quota."""
    quota = quota_for(target) or new_quota(target)
    for name, value in limits.items():
        setattr(quota, name, value)
    quota.save()
    return quota
