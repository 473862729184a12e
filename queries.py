"""Reading images from the database: one by id, a user's pages (with search), stored keys."""

import functools
import operator
import sys

from peewee import JOIN, SQL, NodeList, Value, fn

import compiled
from compiled import slot
from errors import ValidationError
from models import Collaborator, Image, Namespace, User
from representations import IMAGE_ROW

PAGE_SIZE = 25
# Ids are 64-bit in every database; a larger one from a URL names nothing (and would
# overflow SQLite's integer binding).
MAX_ID = (1 << 63) - 1
# The last page whose LIMIT and OFFSET the databases can still bind (64-bit integers):
# every later page lies past the end of any table.
MAX_PAGE = (MAX_ID - PAGE_SIZE) // PAGE_SIZE
# int() and str() refuse numbers of more digits than this (Python's guard against slow
# conversions); a longer page number is read as the largest one they take.
PAGE_DIGITS = sys.get_int_max_str_digits() or 4300
# SQLite allows 500 terms in a compound SELECT; past this many shared namespaces, they are
# read in one term (sorting all their images) instead of one index walk each.
MAX_NAMESPACE_TERMS = 200


# What an image is read with, by the attribute path each is found at (IMAGE_ROW's prefixes).
RELATIONS = ("", "author", "user", "namespace", "namespace.user")


def _with_relations(columns=None):
    """Images with author, user, namespace and the namespace's user, in one query: whole
    models in the order of RELATIONS, or columns(sources) picked from them (sources by
    RELATIONS)."""
    sources = dict(zip(RELATIONS, (Image, User.alias(), User.alias(), Namespace, User.alias()),
                       strict=True))
    author, owner, ns_owner = sources["author"], sources["user"], sources["namespace.user"]
    selection = tuple(sources.values()) if columns is None else columns(sources)
    return (
        Image.select(*selection)
        .join_from(Image, author, on=(Image.author == author.id), attr="author")
        .join_from(Image, owner, on=(Image.user == owner.id), attr="user")
        .join_from(Image, Namespace, JOIN.LEFT_OUTER, attr="namespace")
        .join_from(Namespace, ns_owner, JOIN.LEFT_OUTER, on=(Namespace.user == ns_owner.id),
                   attr="user")
    )


def image_row_columns(sources):
    """The columns named by representations.IMAGE_ROW ("author.email": the author's)."""
    columns = []
    for name in IMAGE_ROW:
        prefix, _, attr = name.rpartition(".")
        columns.append(getattr(sources[prefix], attr))
    return columns


def _image_by_id():
    """The image whose id is in slot "id", with its relations."""
    return _with_relations().where(Image.id == slot("id"))


def find_image(image_id):
    """The image with its relations, or None. Compiled once (compiled.py): every request
    about one image, and each Range request of a VM booting from a link, asks for it."""
    if not 0 < image_id <= MAX_ID:
        return None
    found = compiled.graph(_image_by_id, {"id": image_id}, RELATIONS)
    return found[0] if found else None


def _like_pattern(text):
    """A LIKE pattern for a case-insensitive substring in which % and _ match themselves."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _name_contains(pattern):
    """The image's lowercased name LIKE pattern (from _like_pattern), with its escape."""
    return NodeList((fn.LOWER(Image.name), SQL("LIKE"), pattern, SQL("ESCAPE"), Value("\\")))


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


def _newest_first(query, searching, named):
    """The ids and times of the newest `count` images of query, as a term of a UNION."""
    if searching:
        query = query.where(_name_contains(slot("pattern")))
    if named:
        query = query.where(Image.name == slot("name"))
    query = query.order_by(Image.created_at.desc(), Image.id.desc()).limit(slot("count"))
    return query.select_from(query.c.id, query.c.created_at)


def _shared_namespaces_query():
    """Ids of the namespaces under the roots that the user (slot "user") collaborates on."""
    return (Namespace.select(Namespace.id)
            .join(Collaborator, on=(Collaborator.namespace == Namespace.root))
            .where(Collaborator.user == slot("user")))


def _shared_namespace_ids(user):
    """Ids of the namespaces under the roots that user collaborates on."""
    return [ns_id for (ns_id,) in compiled.rows(_shared_namespaces_query, {"user": user.id})]


def _page_query(own, namespace_terms, searching, named):
    """One page of images with their relations, newest first, as plain columns.

    The page's ids come from a union of index walks, each cut to what the page can need:
    the newest images the user owns (index user, created_at, id; own "all", or "outside"
    for those outside namespaces alone, or None for none) and the newest in each of
    `namespace_terms` namespaces (index namespace, created_at, id); None means all shared
    namespaces in one term. Slots: user, ns0.., count, pattern, name, offset.
    """
    columns = (Image.id, Image.created_at)
    terms = []
    if own is not None:
        mine = Image.select(*columns).where(Image.user == slot("user"))
        terms.append(mine.where(Image.namespace.is_null()) if own == "outside" else mine)
    if namespace_terms is None:
        terms.append(Image.select(*columns)
                     .where(Image.namespace.in_(_shared_namespaces_query())))
    else:
        terms += [Image.select(*columns).where(Image.namespace == slot(f"ns{k}"))
                  for k in range(namespace_terms)]
    union = functools.reduce(operator.or_,
                             (_newest_first(t, searching, named) for t in terms))
    page_ids = (union.order_by(SQL("2 DESC"), SQL("1 DESC"))
                .limit(PAGE_SIZE + 1).offset(slot("offset"))).alias("page_ids")
    return (_with_relations(image_row_columns)
            .join_from(Image, page_ids, on=(Image.id == page_ids.c.id))
            .order_by(Image.created_at.desc(), Image.id.desc()))


def _page(own, namespace_ids, values, search, name, page):
    """(rows, has_next) of page with _page_query's shape for own and namespace_ids (None:
    the user's shared ones in one term); values has the slots of the user."""
    if page > MAX_PAGE:  # past any table's end, and past what the database can bind
        return [], False
    offset = (page - 1) * PAGE_SIZE
    values = {**values, "count": offset + PAGE_SIZE + 1, "offset": offset}
    if search:
        values["pattern"] = _like_pattern(search)
    if name is not None:
        values["name"] = name
    if namespace_ids is not None:
        values.update((f"ns{k}", ns_id) for k, ns_id in enumerate(namespace_ids))
    terms = None if namespace_ids is None else len(namespace_ids)
    # Compiled once per shape: peewee's compiling of this query was half the page's CPU.
    rows = compiled.rows(_page_query, values, (own, terms, bool(search), name is not None),
                         stored_datetimes=True)
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def list_images(user, search, page, name=None, outside_namespaces=False):
    """One page of the images user owns or collaborates on, as rows in the order of
    representations.IMAGE_ROW; returns (rows, has_next). name: that exact name only;
    outside_namespaces: the user's images outside namespaces only.

    One scan of all images filtered by "owned or shared" cost time in proportion to the
    whole store; the page's query walks indexes instead (_page_query). Two queries: the
    shared namespaces, then the page's images with their relations (one, outside
    namespaces).
    """
    if outside_namespaces:
        return _page("outside", (), {"user": user.id}, search, name, page)
    shared = _shared_namespace_ids(user)
    if len(shared) > MAX_NAMESPACE_TERMS:
        shared = None
    return _page("all", shared, {"user": user.id}, search, name, page)


def list_namespace_images(namespace_id, search, page, name=None):
    """One page of the images of one namespace (not its children), as list_images's rows;
    whether the caller may see them is access.py's question. One query."""
    return _page(None, (namespace_id,), {}, search, name, page)


def has_image_with_key(key):
    """Whether an image row names this storage key (recovery asks, per unsettled key)."""
    return Image.select().where(Image.storage_key == key).exists()


def image_keys():
    """The storage keys of every image row (the sweep's list of files to keep)."""
    return {key for (key,) in Image.select(Image.storage_key).tuples()}


def _public_namespaces():
    """Ids of the namespaces under a public root: anyone may read their images."""
    root = Namespace.alias()
    return (Namespace.select(Namespace.id).join(root, on=(Namespace.root == root.id))
            .where(root.visibility == "public"))


def list_public_images(search, page):
    """One page of the images under public roots, of every user, newest first, as rows of
    representations.IMAGE_ROW; returns (rows, has_next). The web UI's list for a visitor
    without a token."""
    if page > MAX_PAGE:
        return [], False
    query = _with_relations(image_row_columns).where(Image.namespace.in_(_public_namespaces()))
    if search:
        query = query.where(_name_contains(_like_pattern(search)))
    query = (query.order_by(Image.created_at.desc(), Image.id.desc())
             .limit(PAGE_SIZE + 1).offset((page - 1) * PAGE_SIZE))
    rows = [list(row) for row in query.tuples()]
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE
