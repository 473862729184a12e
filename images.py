"""The rules about images: who sees which, listing, creating and deleting, and their JSON."""

import functools
import logging
import operator
import re
import sys
from datetime import UTC

from peewee import JOIN, SQL, IntegrityError, NodeList, Value, fn

from errors import ValidationError, not_found
from models import Collaborator, Image, Namespace, User, write_transaction
from namespaces import (
    can_read,
    can_write,
    ensure_namespace,
    parse_namespace_ref,
    resolve_upload_target,
)
from storage import StorageUnavailable

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
PAGE_SIZE = 25
# Ids are 64-bit in every database; a larger one from a URL names nothing (and would
# overflow SQLite's integer binding).
MAX_ID = (1 << 63) - 1
NAME_TAKEN = "Name already exists"
log = logging.getLogger(__name__)


def rfc3339(moment):
    """2006-01-02T15:04:05Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def last_modified(image):
    """The image's creation time as an aware datetime, for HTTP dates."""
    return image.created_at.replace(tzinfo=UTC)


def user_json(user):
    return {"id": user.id, "email": user.email, "username": user.username,
            "created_at": rfc3339(user.created_at)}


def namespace_json(ns, base_url):
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


def _with_relations():
    """Images with author, user, namespace and the namespace's user, in one query."""
    author, owner, ns_owner = User.alias(), User.alias(), User.alias()
    return (
        Image.select(Image, author, owner, Namespace, ns_owner)
        .join_from(Image, author, on=(Image.author == author.id), attr="author")
        .join_from(Image, owner, on=(Image.user == owner.id), attr="user")
        .join_from(Image, Namespace, JOIN.LEFT_OUTER, attr="namespace")
        .join_from(Namespace, ns_owner, JOIN.LEFT_OUTER, on=(Namespace.user == ns_owner.id),
                   attr="user")
    )


def _name_contains(text):
    """Case-insensitive substring match in which % and _ match themselves."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return NodeList((fn.LOWER(Image.name), SQL("LIKE"), Value(f"%{escaped}%"),
                     SQL("ESCAPE"), Value("\\")))


# The last page whose LIMIT and OFFSET the databases can still bind (64-bit integers):
# every later page lies past the end of any table.
MAX_PAGE = (MAX_ID - PAGE_SIZE) // PAGE_SIZE
# int() and str() refuse numbers of more digits than this (Python's guard against slow
# conversions); a longer page number is read as the largest one they take.
PAGE_DIGITS = sys.get_int_max_str_digits() or 4300


def parse_page(value):
    """1-based page; a missing, non-numeric or < 1 value means 1."""
    # isascii: str.isdigit() also accepts '²', which int() refuses.
    if not (value and value.isascii() and value.isdigit()):
        return 1
    digits = value.lstrip("0")
    if len(digits) > PAGE_DIGITS:
        return 10 ** PAGE_DIGITS - 1
    return max(int(digits or "0"), 1)


def check_search(text):
    """Refuse a search that SQL cannot hold: a NUL (PostgreSQL refuses it in any string,
    SQLite would end the pattern there and match everything)."""
    if text and "\x00" in text:
        raise ValidationError("search", "Search must not contain a NUL character")
    return text


# SQLite allows 500 terms in a compound SELECT; past this many shared namespaces, they are
# read in one term (sorting all their images) instead of one index walk each.
MAX_NAMESPACE_TERMS = 200


def _newest_first(query, search, count):
    """The ids and times of the newest `count` images of query, as a term of a UNION."""
    if search:
        query = query.where(_name_contains(search))
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(count)
    return query.select_from(query.c.id, query.c.created_at)


def _shared_namespace_ids(user):
    """Ids of the namespaces under the roots that user collaborates on."""
    return [ns_id for (ns_id,) in (
        Namespace.select(Namespace.id)
        .join(Collaborator, on=(Collaborator.namespace == Namespace.root))
        .where(Collaborator.user == user.id).tuples())]


def list_images(user, search, page):
    """One page of the images user owns or collaborates on; returns (images, has_next).

    The page's ids come from a union of index walks, each cut to what the page can need:
    the newest images the user owns (index user, created_at, id) and the newest in each
    namespace shared with them (index namespace, created_at, id). One scan of all images
    filtered by "owned or shared" cost time in proportion to the whole store instead.
    Two queries: the shared namespaces, then the page's images with their relations.
    """
    if page > MAX_PAGE:  # past any table's end, and past what the database can bind
        return [], False
    offset = (page - 1) * PAGE_SIZE
    count = offset + PAGE_SIZE + 1
    columns = (Image.id, Image.created_at)
    terms = [Image.select(*columns).where(Image.user == user.id)]
    shared = _shared_namespace_ids(user)
    if len(shared) > MAX_NAMESPACE_TERMS:
        terms.append(Image.select(*columns).where(Image.namespace.in_(shared)))
    else:
        terms += [Image.select(*columns).where(Image.namespace == ns_id) for ns_id in shared]
    union = functools.reduce(operator.or_, (_newest_first(t, search, count) for t in terms))
    page_ids = (union.order_by(SQL("2 DESC"), SQL("1 DESC"))
                .limit(PAGE_SIZE + 1).offset(offset)).alias("page_ids")
    rows = list(_with_relations()
                .join_from(Image, page_ids, on=(Image.id == page_ids.c.id))
                .order_by(Image.created_at.desc(), Image.id.desc()))
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def find_image(image_id):
    """The image with its relations, or None."""
    if not 0 < image_id <= MAX_ID:
        return None
    return _with_relations().where(Image.id == image_id).first()


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
    return {"author": user, "owner": owner, "namespace": namespace, "ref": ref, "name": name}


def _name_taken(owner, ref, namespace, name):
    """Whether name is used where the upload goes: the namespace, or the owner's images
    outside namespaces. A namespace that is still to be created holds no image yet."""
    if ref is not None:
        return namespace is not None and Image.select().where(
            Image.namespace == namespace.id, Image.name == name).exists()
    return Image.select().where(Image.user == owner.id, Image.namespace.is_null(),
                                Image.name == name).exists()


def create_image(plan, storage, staged, size, sha256, info):
    """Move the inspected file into the store, then record it; a failure removes the file.

    The file goes in first so that a crash leaves at worst a file without a row, never a
    row without a file; put() leaves an intent on the key until the row is committed, so
    that recover() finds such a file after a crash. The database settles a race on the
    name: the loser's unique-index error becomes the same 400.
    """
    key = storage.put(staged)
    try:
        with write_transaction():
            namespace = plan["namespace"]
            if plan["ref"] and namespace is None:
                namespace = ensure_namespace(plan["owner"], plan["ref"].segments)
            image = Image.create(author=plan["author"], user=plan["owner"], namespace=namespace,
                                 name=plan["name"], storage_key=key, size=size,
                                 virtual_size=info.virtual_size, sha256=sha256)
    except IntegrityError:
        _remove_file(storage, key)
        raise ValidationError("name", NAME_TAKEN) from None
    except BaseException:
        _remove_file(storage, key)
        raise
    storage.intents.settle(key)
    return find_image(image.id)


def _remove_file(storage, key):
    storage.delete(key)
    storage.intents.settle(key)


def delete_image(image, storage):
    """Remove the row, then the file once the row is surely gone (under an intent, so
    that a crash between the two leaves nothing that recover() does not remove).

    Once the row is gone the image is gone: a store that fails to remove the file keeps
    the intent, and the file is removed by the next recover() or `flask sweep`, not an
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


def recover(storage):
    """Finish what killed processes left half done; return (temporary files, orphan files)
    removed. A key with an unsettled intent keeps its file only if its row exists."""
    temporary = storage.sweep()
    orphans = 0
    for key, pid in storage.intents.unsettled():
        if not Image.select().where(Image.storage_key == key).exists():
            try:
                storage.delete(key)
            except OSError as error:  # a store that is down: keep the intent for next time
                log.warning("could not remove orphan %s yet: %s", key, error)
                continue
            orphans += 1
        storage.intents.settle(key, pid)
    return temporary, orphans


def orphan_keys(storage, older_than):
    """Stored files with no row (left by a crash between put and commit, or delete and unlink).

    An upload holds an intent on its key from before the file appears until after its row
    is committed. So the keys are listed first, then the intents, then the rows: a file
    listed is either still under its intent, or its row was committed before the rows
    are read. Listing rows first lost files whose row came in between, and a file under
    a live upload's intent was removed whenever it was older than `older_than`.
    """
    listed = storage.keys(older_than=older_than)
    pending = storage.intents.intended_keys()
    known = {key for (key,) in Image.select(Image.storage_key).tuples()}
    return [key for key in listed if key not in pending and key not in known]


