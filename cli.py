"""Admin commands: `flask --app app user|token|namespace ...`, init-db and sweep."""

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from peewee import IntegrityError

import images
from auth import issue_token, parse_scopes
from errors import ValidationError
from models import Collaborator, Token, User, db
from namespaces import check_visibility, ensure_namespace, find_namespace, parse_namespace_ref

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


@user_cli.command("create")
@click.argument("username")
@click.argument("email")
def create_user(username, email):
    """Create a user; print its id."""
    try:
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
        created = images.rfc3339(token.created_at)
        click.echo(f"{token.id}\t{token.name or '-'}\t{token.scopes}\t{created}")


@token_cli.command("revoke")
@click.argument("token_id", type=int)
def revoke_token(token_id):
    """Delete a token; it stops working at once."""
    if not Token.delete().where(Token.id == token_id).execute():
        raise click.ClickException(f"no token with id {token_id}")
    click.echo(f"revoked {token_id}")


@namespace_cli.command("create")
@click.argument("path")
@click.option("--owner", required=True)
@click.option("--visibility", default="private",
              type=click.Choice(["private", "internal", "public"]))
def create_namespace(path, owner, visibility):
    """Create a namespace (and missing parents); print its id."""
    ref = _ref(path)
    with db.atomic():
        ns = ensure_namespace(_user(owner), ref.segments, check_visibility(visibility))
    click.echo(ns.id)


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
    """Remove temporary files of dead workers and stored files that have no row."""
    store = current_app.extensions["storage"]
    removed, settled = images.recover(store)
    orphans = images.orphan_keys(store, older_than=min_age)
    for key in orphans:
        store.delete(key)
    click.echo(f"removed {removed} temporary files and {settled + len(orphans)} orphan files")


def register_cli(app):
    """Attach the admin commands to the app's `flask` CLI."""
    for command in (user_cli, token_cli, namespace_cli, init_db, sweep):
        app.cli.add_command(command)
