"""Admin commands: `flask --app app user|token|namespace|webhook|job|quota ...`, init-db,
sweep."""

from datetime import UTC, datetime

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from peewee import IntegrityError, fn

import jobs
import quotas
import webhooks
from auth import issue_token, parse_scopes
from config import parse_size
from errors import ValidationError
from models import (
    VISIBILITIES,
    Collaborator,
    Job,
    Namespace,
    Token,
    User,
    Webhook,
    WebhookDelivery,
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
webhook_cli = AppGroup("webhook", help="Manage the webhooks of namespaces.")
job_cli = AppGroup("job", help="See and run background jobs.")
quota_cli = AppGroup("quota", help="Manage quotas of users and of root namespaces.")


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
    ns = _named_namespace(ref)
    Collaborator.get_or_create(namespace=ns.root_id, user=_user(username))
    click.echo(f"{username} collaborates on {ns.root.path}@{ns.user.username}")


def _named_namespace(text, hint="REF"):
    """The namespace that PATH@OWNER names; the owner must be named, and it must exist."""
    parsed = _ref(text)
    if parsed.owner is None:
        raise click.BadParameter("name the owner: PATH@OWNER", param_hint=hint)
    ns = find_namespace(_user(parsed.owner), parsed.path)
    if ns is None:
        raise click.ClickException(f"no namespace {text!r}")
    return ns


def _quota_target(text):
    """The User, or the root Namespace, that USERNAME or PATH@OWNER names."""
    if "@" not in text and "/" not in text:
        return _user(text)
    ns = _named_namespace(text, "TARGET")
    if ns.parent_id is not None:
        raise click.ClickException(
            f"{text} is not a root: a namespace quota is kept on its root, and counts all "
            f"below it: use {ns.root.path}@{ns.user.username}")
    return ns


# The largest limit a BIGINT column holds.
MAX_LIMIT = (1 << 63) - 1


def _image_count(text):
    """A whole number of images, or a ValueError saying what was wrong."""
    if not text.strip().isdigit():
        raise ValueError(f"not a number of images: {text!r} (use a whole number, like 100)")
    return int(text)


def _limit(text, parse, hint):
    """The limit an option gives: None for 'none' (no limit), else parse(text) in range."""
    if text.strip().lower() == "none":
        return None
    try:
        value = parse(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=hint) from None
    if value > MAX_LIMIT:
        raise click.BadParameter(f"at most {MAX_LIMIT}", param_hint=hint)
    return value


def _human(size):
    """size in bytes the short way, as --bytes takes it: 50G, 1.5T, 197632."""
    for suffix, unit in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                         ("K", 1 << 10)):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + suffix
    return str(size)


def _show_quota(target):
    """Print target's limits, if it has a quota, and its use (what uploads count)."""
    quota = quotas.quota_for(target)
    label = quotas.target_label(target)
    click.echo(f"quota of {label}" if quota else f"quota of {label}: none set")
    quota = quota or quotas.new_quota(target)
    use = quotas.usage(quota)
    bytes_limit = "no limit" if quota.max_bytes is None else \
        f"limit {quota.max_bytes} ({_human(quota.max_bytes)})"
    images_limit = "no limit" if quota.max_images is None else f"limit {quota.max_images}"
    click.echo(f"bytes: {use.bytes} used ({_human(use.bytes)}), {bytes_limit}")
    click.echo(f"images: {use.images} used, {images_limit}")


@quota_cli.command("set")
@click.argument("target")
@click.option("--bytes", "max_bytes", help="most bytes stored, e.g. 50G; none lifts it")
@click.option("--images", "max_images", help="most images, e.g. 100; none lifts it")
def set_quota(target, max_bytes, max_images):
    """Limit the bytes and/or images of USERNAME, or of the root namespace PATH@OWNER and
    all below it; a limit not given stays as it was. Print the quota and its use."""
    limits = {}
    if max_bytes is not None:
        limits["max_bytes"] = _limit(max_bytes, parse_size, "--bytes")
    if max_images is not None:
        limits["max_images"] = _limit(max_images, _image_count, "--images")
    if not limits:
        raise click.UsageError("give --bytes, --images or both")
    with write_transaction():
        found = _quota_target(target)
        quotas.set_quota(found, **limits)
    _show_quota(found)


@quota_cli.command("show")
@click.argument("target")
def show_quota(target):
    """Print the limits of USERNAME's or PATH@OWNER's quota and their use."""
    _show_quota(_quota_target(target))


@quota_cli.command("clear")
@click.argument("target")
def clear_quota(target):
    """Remove the quota of USERNAME or PATH@OWNER: no limits any more."""
    found = _quota_target(target)
    quota = quotas.quota_for(found)
    if quota is None:
        raise click.ClickException(f"{quotas.target_label(found)} has no quota")
    quota.delete_instance()
    click.echo(f"cleared the quota of {quotas.target_label(found)}")


def _owned_namespace(ref):
    """The namespace that PATH@OWNER names, or a clear failure."""
    parsed = _ref(ref)
    if parsed.owner is None:
        raise click.BadParameter("name the owner: PATH@OWNER", param_hint="REF")
    ns = find_namespace(_user(parsed.owner), parsed.path)
    if ns is None:
        raise click.ClickException(f"no namespace {ref!r}")
    return ns


def _webhook(webhook_id):
    webhook = Webhook.get_or_none(Webhook.id == webhook_id)
    if webhook is None:
        raise click.ClickException(f"no webhook with id {webhook_id}")
    return webhook


@webhook_cli.command("create")
@click.argument("ref")
@click.argument("url")
@click.option("--secret", required=True, help="signs each delivery (X-Djinn-CI-Signature)")
def create_webhook(ref, url, secret):
    """Send the images events of PATH@OWNER and its children to URL; print the id."""
    namespace = _owned_namespace(ref)
    try:
        webhook = webhooks.add_webhook(namespace, url, secret)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    click.echo(webhook.id)


@webhook_cli.command("list")
@click.argument("ref")
def list_webhooks(ref):
    """Print id, URL and creation time of each webhook of PATH@OWNER (never the secret)."""
    namespace = _owned_namespace(ref)
    for webhook in Webhook.select().where(Webhook.namespace == namespace).order_by(Webhook.id):
        click.echo(f"{webhook.id}\t{webhook.url}\t{rfc3339(webhook.created_at)}")


@webhook_cli.command("delete")
@click.argument("webhook_id", type=int)
def delete_webhook(webhook_id):
    """Delete a webhook and its deliveries; events not yet sent are dropped."""
    if not Webhook.delete().where(Webhook.id == webhook_id).execute():
        raise click.ClickException(f"no webhook with id {webhook_id}")
    click.echo(f"deleted {webhook_id}")


@webhook_cli.command("deliveries")
@click.argument("webhook_id", type=int)
def list_deliveries(webhook_id):
    """Print each try, newest last: time, action, try number, HTTP status or the error."""
    tries = WebhookDelivery.select().where(WebhookDelivery.webhook == _webhook(webhook_id))
    for sent in tries.order_by(WebhookDelivery.id):
        outcome = sent.status if sent.error is None else sent.error
        click.echo(f"{rfc3339(sent.created_at)}\t{sent.action}\t{sent.try_number}\t{outcome}")


@job_cli.command("list")
def list_jobs():
    """Print each job not done: id, kind, state, tries, next run, last error."""
    for job in Job.select().order_by(Job.id):
        run_at = datetime.fromtimestamp(job.run_at, UTC).replace(tzinfo=None, microsecond=0)
        click.echo(f"{job.id}\t{job.kind}\t{job.state}\t{job.attempts}\t{rfc3339(run_at)}"
                   f"\t{job.last_error or '-'}")


@job_cli.command("run")
def run_jobs():
    """Run the jobs that are due now, here in the foreground (where no gunicorn worker
    runs them, e.g. beside `flask run`); print how many ran."""
    click.echo(f"ran {jobs.run_due_jobs()} jobs")


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
    """Remove temporary files of dead workers, stored files that have no row, resumable
    uploads past their expiry (with their bytes), and failed jobs and webhook delivery
    records older than JOB_HISTORY."""
    store = current_app.extensions["storage"]
    removed, settled = recover(store, has_image_with_key)
    orphans = orphan_keys(store, older_than=min_age, keys_with_rows=image_keys)
    for key in orphans:
        store.delete(key)
    click.echo(f"removed {removed} temporary files and {settled + len(orphans)} orphan files")
    expired = sweep_expired(store)
    if expired:  # a line of its own, only then: scripts read the line above as it was
        click.echo(f"removed {expired} expired uploads")
    failed = jobs.prune_failed()
    records = webhooks.prune_deliveries()
    if failed or records:
        click.echo(f"removed {failed} failed jobs and {records} webhook delivery records "
                   "older than JOB_HISTORY")


def register_cli(app):
    """Attach the admin commands to the app's `flask` CLI."""
    for command in (user_cli, token_cli, namespace_cli, webhook_cli, job_cli, quota_cli, init_db,
                    sweep):
        app.cli.add_command(command)
