"""Namespaces: parsing `path[@owner]`, who may read or write, creating missing paths."""

import re
from dataclasses import dataclass

from peewee import JOIN, IntegrityError

import compiled
from compiled import slot
from errors import ValidationError
from models import Collaborator, Namespace, User, db

SEGMENT = re.compile(r"[a-zA-Z0-9]+")
USERNAME = re.compile(r"[a-zA-Z0-9_.-]+")
MAX_DEPTH = 20
# The columns' sizes: longer text cannot name anything (and PostgreSQL refuses to store it).
MAX_SEGMENT = Namespace.name.max_length
MAX_USERNAME = User.username.max_length
PERMISSION_DENIED = "Namespace permission denied"


@dataclass(frozen=True)
class NamespaceRef:
    """A parsed `path[@owner]`: the path's segments and the owner's username, if named."""

    segments: tuple
    owner: str | None

    @property
    def path(self):
        return "/".join(self.segments)


def parse_namespace_ref(text):
    """Parse `a/b/c@owner`; raise ValidationError on anything else."""
    path, at, owner = text.partition("@")
    segments = tuple(path.split("/"))
    if not all(SEGMENT.fullmatch(s) for s in segments):
        raise ValidationError(
            "namespace", "Namespace path segments must match [a-zA-Z0-9]+, joined by /")
    if len(segments) > MAX_DEPTH:
        raise ValidationError("namespace", f"Namespace path deeper than {MAX_DEPTH}")
    if any(len(s) > MAX_SEGMENT for s in segments):
        raise ValidationError(
            "namespace", f"Namespace path segments must be at most {MAX_SEGMENT} characters")
    if at and not USERNAME.fullmatch(owner):
        raise ValidationError("namespace", "Namespace owner must be a username after @")
    if len(owner) > MAX_USERNAME:
        raise ValidationError(
            "namespace", f"Namespace owner must be at most {MAX_USERNAME} characters")
    return NamespaceRef(segments, owner or None)


def may_read(user, visibility, is_writer):
    """Who reads a namespace, by its root's visibility: anyone, without a token too (user
    None), under a public root; any user under an internal one; else its writers
    (is_writer(): owner or collaborator, asked only then)."""
    if visibility == "public":
        return True
    if user is None:
        return False
    return visibility == "internal" or is_writer()


@dataclass(frozen=True)
class NamespaceAccess:
    """A namespace as its readers are decided: its id, its root's visibility, and whether
    the asking user writes to it (owns its root or collaborates on it: collaborators are
    kept on the root and cover all its children)."""

    id: int
    visibility: str
    writer: bool


def _access_query(by_path):
    """The namespace with id slot "id" (by_path: of username slot "owner" at slot "path"),
    with its root's visibility, the root's owner and slot "user"'s collaboration on the
    root (NULL when none)."""
    owner, root = User.alias(), Namespace.alias()
    query = (Namespace.select(Namespace.id, root.visibility, root.user, Collaborator.id)
             .join_from(Namespace, root, on=(Namespace.root == root.id))
             .join_from(Namespace, Collaborator, JOIN.LEFT_OUTER,
                        on=((Collaborator.namespace == root.id)
                            & (Collaborator.user == slot("user")))))
    if not by_path:
        return query.where(Namespace.id == slot("id"))
    return (query.join_from(Namespace, owner, on=(Namespace.user == owner.id))
            .where(owner.username == slot("owner"), Namespace.path == slot("path"))
            .limit(1))


def _access(user, values, by_path):
    """The NamespaceAccess that _access_query(by_path) finds for user, or None. One
    compiled query: reading the root and the collaboration through peewee's models took
    two queries compiled anew each time, most of a request about an image in a namespace."""
    found = compiled.rows(_access_query, {**values, "user": user.id if user else None},
                          (by_path,))
    if not found:
        return None
    ns_id, visibility, root_owner, collaboration = found[0]
    writer = user is not None and (root_owner == user.id or collaboration is not None)
    return NamespaceAccess(ns_id, visibility, writer)


def namespace_access(user, ref):
    """The NamespaceAccess of ref (owner: user's own when it names none) for user (None:
    no token), or None when there is no such namespace; one query."""
    owner = ref.owner or (user.username if user is not None else None)
    if owner is None:
        return None
    return _access(user, {"owner": owner, "path": ref.path}, by_path=True)


def can_write(user, namespace):
    """Owner or collaborator of the namespace's root."""
    found = _access(user, {"id": namespace.id}, by_path=False)
    return found is not None and found.writer


def can_read(user, namespace):
    """may_read for a namespace model; user None for a request without a token."""
    found = _access(user, {"id": namespace.id}, by_path=False)
    return found is not None and may_read(user, found.visibility, lambda: found.writer)


def find_namespace(owner, path):
    """The owner's namespace at path, or None."""
    return Namespace.get_or_none(Namespace.user == owner, Namespace.path == path)


def resolve_upload_target(user, ref):
    """Check that user may upload into ref; return (owner, existing namespace or None).

    A missing path of the user's own is created later, with the image, so that a
    failed upload creates nothing. Someone else's must exist, and the answer is the
    same whether it is missing or forbidden, so that nobody learns what exists.
    """
    if ref.owner is None or ref.owner == user.username:
        return user, find_namespace(user, ref.path)
    owner = User.get_or_none(User.username == ref.owner)
    namespace = owner and find_namespace(owner, ref.path)
    if namespace is None or not can_write(user, namespace):
        raise ValidationError("namespace", PERMISSION_DENIED)
    return owner, namespace


def ensure_namespace(owner, segments, visibility="private"):
    """Return the owner's namespace at segments, creating it and missing parents.

    visibility is that of a new root; a new child takes its root's, which is the one that
    counts (can_read), so that what the API shows agrees with who may read.
    """
    parent = None
    for depth in range(1, len(segments) + 1):
        path = "/".join(segments[:depth])
        found = find_namespace(owner, path)
        if found is None:
            inherited = parent.root.visibility if parent else visibility
            found = _create_one(owner, parent, segments[depth - 1], path, inherited)
        parent = found
    return parent


def _create_one(owner, parent, name, path, visibility):
    """Create one namespace; when a concurrent request made it first, use theirs."""
    try:
        with db.atomic():  # a savepoint: a lost race must not abort the caller's transaction
            ns = Namespace.create(user=owner, parent=parent, name=name, path=path,
                                  visibility=visibility, root=parent.root if parent else None)
            if parent is None:
                ns.root = ns
                ns.save(only=[Namespace.root])
            return ns
    except IntegrityError:
        return find_namespace(owner, path)

