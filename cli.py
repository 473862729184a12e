"""Admin commands: `flask --app app user|token|namespace ...`, init-db and sweep."""

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from peewee import IntegrityError, fn

from auth import issue_token, parse_scopes
from errors import ValidationError
from models import (
    VISIBILITIES,
    Collaborator,
    Namespace,
    Token,
    User,
    write_transaction,
)
from namespaces import MAX_USERNAME, USERNAME, ensure_namespace, find_namespace, parse_namespace_ref
from queries import has_image_with_key, image_keys
from recovery import orphan_keys, recover
from representations import rfc3339
from tusuploads import sweep_expired

user_cli = AppGroup("user", help="Manage users.")
token_cli = AppGroup("token", help="Manage API tokens.")
namespace_cli = AppGroup("namespace", help="Manage namespaces.")


def _user(username):
    user = User.get_or_none(User.username == username)
    if user is None:
        raise click.ClickException(f"no user named {username!r}")
    return user


def _ref(text):
    try:
        return parse_namespace_ref(text)
    except ValidationError as error:
        raise click.BadParameter(error.fields["namespace"][0]) from None


def _check_username(username):
    """Refuse a username that `path@owner` cannot name, or that differs from one in use
    by case alone (two such users could not be told apart by a person reading a path)."""
    if not USERNAME.fullmatch(username) or username in (".", ".."):
        raise click.BadParameter(
            "use letters, digits, '_', '.' and '-' (not '.' or '..' alone)",
            param_hint="USERNAME")
    if len(username) > MAX_USERNAME:
        raise click.BadParameter(f"at most {MAX_USERNAME} characters", param_hint="USERNAME")
    twin = User.get_or_none(fn.LOWER(User.username) == username.lower())
    if twin is not None:
        raise click.ClickException(f"user {twin.username!r} already exists")


def _check_email(email):
    """Refuse what cannot be an address, or would not fit its column."""
    limit = User.email.max_length
    if len(email) > limit or email.count("@") != 1 or not email.isprintable() \
            or any(c.isspace() for c in email):
        raise click.BadParameter(f"an address like me@example.com, at most {limit} characters",
                                 param_hint="EMAIL")


@user_cli.command("create")
@click.argument("username")
@click.argument("email")
def create_user(username, email):
    """Create a user; print its id."""
    _check_email(email)
    try:
        # One write transaction: on SQLite, two creates of case twins take turns.
        with write_transaction():
            _check_username(username)
            user = User.create(username=username, email=email)
    except IntegrityError:
        raise click.ClickException(f"user {username!r} already exists") from None
    click.echo(user.id)


@token_cli.command("create")
@click.argument("username")
@click.option("--scope", required=True, help='e.g. "image:read,write,delete"')
@click.option("--name", default="", help="a label to tell tokens apart")
def create_token(username, scope, name):
    """Issue a token; print it alone (it is shown only this once)."""
    try:
        scopes = parse_scopes(scope)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--scope") from None
    click.echo(issue_token(_user(username), scopes, name))


@token_cli.command("list")
@click.argument("username")
def list_tokens(username):
    """Print id, name, scopes and creation time of each token (never the secret)."""
    for token in Token.select().where(Token.user == _user(username)).order_by(Token.id):
        created = rfc3339(token.created_at)
        click.echo(f"{token.id}\t{token.name or '-'}\t{token.scopes}\t{created}")


@token_cli.command("revoke")
@click.argument("token_id", type=int)
def revoke_token(token_id):
    """Delete a token; it stops working at once."""
    if not Token.delete().where(Token.id == token_id).execute():
        raise click.ClickException(f"no token with id {token_id}")
    click.echo(f"revoked {token_id}")


def _described(ns, owner):
    """'path@owner (id N, visibility V)', V being the root's, which is what counts."""
    return f"{ns.path}@{owner.username} (id {ns.id}, visibility {ns.root.visibility})"


@namespace_cli.command("create")
@click.argument("path")
@click.option("--owner", required=True)
@click.option("--visibility", type=click.Choice(VISIBILITIES),
              help="of a new root (default private); a child has its root's")
def create_namespace(path, owner, visibility):
    """Create a namespace (and missing parents); print its id.

    One that exists is left as it is: its id is printed when it already has the asked
    visibility (or none was asked), else the command fails and says how to change it.
    """
    ref = _ref(path)
    with write_transaction():
        user = _user(owner)
        ns = find_namespace(user, ref.path) or find_namespace(user, ref.segments[0])
        if ns is not None and visibility not in (None, ns.root.visibility):
            _refuse_other_visibility(ns, ref, user)
        existed = ns is not None and ns.path == ref.path
        ns = ensure_namespace(user, ref.segments, visibility or "private")
    if existed:
        click.echo(f"namespace {_described(ns, user)} exists", err=True)
    click.echo(ns.id)


def _refuse_other_visibility(ns, ref, user):
    """Fail for a create whose --visibility the namespace (or the root it would be under)
    does not have: create never changes a visibility."""
    if ns.path == ref.path:
        raise click.ClickException(f"namespace {_described(ns, user)} exists; "
                                   "use set-visibility to change it")
    raise click.ClickException(
        f"{ref.path}@{user.username} would be under {_described(ns, user)}, and a "
        "namespace has its root's visibility; use set-visibility on the root to change it")


@namespace_cli.command("set-visibility")
@click.argument("ref")
@click.argument("visibility", type=click.Choice(VISIBILITIES))
def set_visibility(ref, visibility):
    """Make the root namespace PATH@OWNER, and so all below it, private, internal or public.

    Only a root's visibility counts, and it covers its children: a child is refused, so
    that nobody changes a whole tree while naming one branch of it.
    """
    parsed = _ref(ref)
    if parsed.owner is None:
        raise click.BadParameter("name the owner: PATH@OWNER", param_hint="REF")
    user = _user(parsed.owner)
    with write_transaction():
        ns = find_namespace(user, parsed.path)
        if ns is None:
            raise click.ClickException(f"no namespace {ref!r}")
        if ns.parent_id is not None:
            raise click.ClickException(
                f"{ref} is not a root: it has the visibility of {_described(ns.root, user)}; "
                f"set that: set-visibility {ns.root.path}@{user.username} {visibility}")
        was = ns.visibility
        # Children carry the value too (the API shows it): they follow their root.
        Namespace.update(visibility=visibility).where(Namespace.root == ns.id).execute()
    click.echo(f"{ns.path}@{user.username}: visibility {visibility} (was {was})")


@namespace_cli.command("add-collaborator")
@click.argument("ref")
@click.argument("username")
def add_collaborator(ref, username):
    """Let USERNAME read and write in the root of PATH@OWNER and all below it."""
    parsed = _ref(ref)
    if parsed.owner is None:
        raise click.BadParameter("name the owner: PATH@OWNER", param_hint="REF")
    ns = find_namespace(_user(parsed.owner), parsed.path)
    if ns is None:
        raise click.ClickException(f"no namespace {ref!r}")
    Collaborator.get_or_create(namespace=ns.root_id, user=_user(username))
    click.echo(f"{username} collaborates on {ns.root.path}@{parsed.owner}")


@click.command("init-db")
@with_appcontext
def init_db():
    """Prepare the instance: WAL mode, tables and indexes, secret key, recovery (idempotent).

    Loading the app for this command has done it all (app.prepare_instance); the Procfile's
    release step and gunicorn's master (gunicorn.conf.py) run this before any worker starts.
    """
    click.echo("database ready")


@click.command("sweep")
@with_appcontext
@click.option("--min-age", default=3600, show_default=True,
              help="only remove orphan files older than this many seconds")
def sweep(min_age):
    """Remove temporary files of dead workers, stored files that have no row, and
    resumable uploads past their expiry (with their bytes)."""
    store = current_app.extensions["storage"]
    removed, settled = recover(store, has_image_with_key)
    orphans = orphan_keys(store, older_than=min_age, keys_with_rows=image_keys)
    for key in orphans:
        store.delete(key)
    click.echo(f"removed {removed} temporary files and {settled + len(orphans)} orphan files")
    expired = sweep_expired(store)
    if expired:  # a line of its own, only then: scripts read the line above as it was
        click.echo(f"removed {expired} expired uploads")


def register_cli(app):
    """Attach the admin commands to the app's `flask` CLI."""
    for command in (user_cli, token_cli, namespace_cli, init_db, sweep):
        app.cli.add_command(command)
