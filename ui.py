"""The web UI for people, under /ui/: pages rendered with Jinja2 on the same rules as the API.

Signing in is pasting a token, checked by auth.authenticate and kept in Flask's signed
session cookie; every form carries a CSRF token kept in that session; every answer has a
Content-Security-Policy that allows no inline script or style. docs/ui.md says why.
"""

import hmac
import secrets
import shlex
from functools import partial

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from jinja2.filters import do_filesizeformat
from werkzeug.datastructures import Authorization
from werkzeug.exceptions import HTTPException, NotFound

import image_changes
import queries
from access import public_image, readable_image, writable_image
from api import plan_body_upload, receive_image
from auth import authenticate, parse_scopes
from errors import DISK_FULL, ApiError, ValidationError, disk_full, storage_unavailable_message
from links import parse_expires_in, qemu_fields, sign_link
from outcomes import audited, refused, uploaded
from representations import image_json, images_json, rfc3339
from storage import StorageUnavailable
from urls import base_url

bp = Blueprint("ui", __name__, template_folder="templates", static_folder="static",
               static_url_path="/ui/static")

# No inline script or style anywhere, nothing from another origin, no framing. connect-src
# 'self' is what the upload's XMLHttpRequest and tus requests need.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # A page may hold a signed link: no Referer takes it to another site.
    "Referrer-Policy": "no-referrer",
}
LINK_EXPIRIES = ((3600, "1 hour"), (86400, "1 day"), (7 * 86400, "7 days"))
# An image one may not see is a missing one (access.py): the page says no more.
NO_SUCH_PAGE = "There is no such page."
# The environment variable the imagestore client reads its token from (issue 14).
TOKEN_VARIABLE = "IMAGESTORE_TOKEN"


class CsrfRefused(Exception):
    """A form came without the CSRF token of this session."""


class SignInNeeded(Exception):
    """The page needs a signed-in user: the sign-in page, and back here after."""


class UiSession(SecureCookieSessionInterface):
    """Flask's signed session cookie, Secure whenever the page was asked for over HTTPS
    (directly, or through a proxy whose X-Forwarded-Proto the operator trusts) or the
    service's PUBLIC_URL is https: the browser then never sends it in clear."""

    def get_cookie_secure(self, app):
        public = app.config.get("PUBLIC_URL") or ""
        return request.is_secure or public.startswith("https://")


def register_ui(app):
    """Add the UI to app: its blueprint, and a session cookie that only /ui/ pages see."""
    app.config.update(SESSION_COOKIE_NAME="imagestore_ui", SESSION_COOKIE_PATH="/ui",
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    app.session_interface = UiSession()
    app.register_blueprint(bp)


@bp.before_app_request
def send_browsers_to_the_ui():
    """`/` asked for by a browser (HTML preferred to JSON) goes to /ui/; any other request
    for `/` is routed as before (a JSON 404): the API does not change."""
    if request.path == "/" and request.method in ("GET", "HEAD") and prefers_html():
        return redirect(url_for("ui.index"))
    return None


def prefers_html():
    """Whether the client's Accept header ranks HTML above JSON (and names it)."""
    accept = request.accept_mimetypes
    return accept["text/html"] > 0 and accept["text/html"] > accept["application/json"]


def wants_json():
    """The upload script asks for JSON answers (Accept: application/json)."""
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == \
        "application/json"


# --- who is looking --------------------------------------------------------------------

@bp.before_request
def load_viewer():
    """The signed-in user (g.viewer) and their token's scopes, from the session's token;
    then the CSRF check of a POST."""
    g.viewer, g.scopes = None, frozenset()
    if request.endpoint == "ui.static":
        return None
    token = session.get("token")
    if token:
        try:
            found = authenticate(Authorization("bearer", token=token))
        except ApiError:  # revoked since it was pasted
            session.pop("token")
            flash("Your token no longer works: sign in again.", "error")
        else:  # g.token: the audit log's user and token id, as for the API (auth.who)
            g.viewer, g.scopes, g.token = found.user, parse_scopes(found.scopes), found
    if request.method == "POST":
        return guard_post()
    return None


def guard_post():
    """Refuse a POST without this session's CSRF token, and send a POST that needs a
    signed-in user to the sign-in page, both before an upload's body is read."""
    expected = session.get("csrf")
    if not expected:
        raise CsrfRefused()
    if g.viewer is None and request.endpoint != "ui.sign_in":
        return redirect(url_for("ui.sign_in_form"), 303)
    sent = request.form.get("csrf_token") or ""
    if not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused()
    return None


def csrf_token():
    """This session's CSRF token, made at its first form."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def may(scope):
    """Whether someone is signed in with a token that holds scope."""
    return g.viewer is not None and scope in g.scopes


def need(scope):
    """Go on only when signed in with scope; else the sign-in page, or a 403 page."""
    if g.viewer is None:
        raise SignInNeeded()
    if scope not in g.scopes:
        raise ApiError(403, f"Your token lacks the {scope} scope: sign in with one that has it")


@bp.context_processor
def page_globals():
    return {"viewer": g.get("viewer"), "csrf_token": csrf_token, "may": may}


@bp.app_template_filter("bytes")
def human_bytes(value):
    """64.0 MiB; a dash for a size not known yet (an import that has not finished)."""
    return "—" if value is None else do_filesizeformat(value, binary=True)


@bp.app_template_filter("when")
def human_time(text):
    """2006-01-02 15:04 UTC, from the API's RFC 3339 time."""
    return f"{text[:10]} {text[11:16]} UTC" if text else "—"


@bp.after_request
def security_headers(response):
    """The CSP and friends on every UI answer; pages that depend on the session are not
    kept in caches."""
    response.headers.extend(SECURITY_HEADERS)
    if request.endpoint != "ui.static":
        response.headers["Cache-Control"] = "no-store"
    return response


# --- signing in and out ----------------------------------------------------------------

@bp.get("/ui/sign-in")
def sign_in_form():
    return render_template("sign_in.html", next=safe_next())


@bp.post("/ui/sign-in")
def sign_in():
    """Check the pasted token as the API checks a bearer token; keep it in the session."""
    text = request.form.get("token", "").strip()
    text = text[len("bearer "):].strip() if text.lower().startswith("bearer ") else text
    try:
        found = authenticate(Authorization("bearer", token=text))
    except ApiError:
        return render_template("sign_in.html", error="That token is not valid.",
                               next=safe_next()), 400
    session.clear()  # a new session: nothing of the one before sign-in carries over
    session["token"] = text
    flash(f"Signed in as {found.user.username}.")
    return redirect(safe_next() or url_for("ui.index"), 303)


def safe_next():
    """The page to return to after signing in: a path of the UI, never another site."""
    target = request.values.get("next", "")
    return target if target.startswith("/ui/") and "//" not in target else ""


@bp.post("/ui/sign-out")
def sign_out():
    session.clear()
    flash("Signed out.")
    return redirect(url_for("ui.index"), 303)


# --- the lists -------------------------------------------------------------------------

@bp.get("/ui/")
def index():
    """The signed-in user's images (as GET /images lists them), else the public ones."""
    if may("image:read"):
        return image_list("Your images", "ui.index",
                          partial(queries.list_images, g.viewer))
    return image_list("Public images", "ui.public", queries.list_public_images)


@bp.get("/ui/public")
def public():
    """The images under public namespaces, of every user, for anyone."""
    return image_list("Public images", "ui.public", queries.list_public_images)


def image_list(title, endpoint, read_page):
    """A page of images with search and pages, read by read_page(search, page)."""
    page = queries.parse_page(request.args.get("page"))
    search = queries.check_search(request.args.get("search")) or ""
    rows, has_next = read_page(search, page)
    return render_template("list.html", title=title, endpoint=endpoint,
                           images=images_json(rows, base_url()), page=page,
                           has_next=has_next, search=search)


# --- one image -------------------------------------------------------------------------

def viewable_image(image_id):
    """The image if the viewer may see it: by their token, or by its public namespace."""
    if may("image:read"):
        return readable_image(g.viewer, image_id)
    return public_image(image_id)


def deletable(image_id):
    """Whether the viewer may delete the image (scope and namespace rights)."""
    if not may("image:delete"):
        return False
    try:
        writable_image(g.viewer, image_id)
    except ApiError:
        return False
    return True


@bp.get("/ui/images/<int:image_id>")
def image_page(image_id):
    """The image's page; ?stored=1 is where a tus upload's script lands when it is done."""
    return render_image(viewable_image(image_id), stored=request.args.get("stored") == "1")


def render_image(image, link=None, status=200, stored=False):
    """The image's page: every field, the lines to fetch and boot it, a link if made."""
    shown = image_json(image, base_url())
    public_root = image.namespace_id is not None and image.namespace.root.visibility == "public"
    return render_template(
        "image.html", image=shown, lines=command_lines(shown, public_root), link=link,
        expiries=LINK_EXPIRIES, can_delete=deletable(image.id), public_root=public_root,
        stored=stored,
    ), status


def namespace_ref(image):
    """The image's namespace as the client names it (path@owner, path alone for the
    viewer's own), or None outside namespaces."""
    namespace = image["namespace"]
    if namespace is None:
        return None
    owner = namespace["user"]["username"]
    mine = g.viewer is not None and g.viewer.username == owner
    return namespace["path"] if mine else f"{namespace['path']}@{owner}"


def command_lines(image, public_root):
    """The shell lines that fetch the image and boot it (shown with copy buttons)."""
    name, ref = image["name"], namespace_ref(image)
    token = "" if public_root else f'-H "Authorization: Bearer ${TOKEN_VARIABLE}" '
    pull = ["imagestore", "pull", name] + (["--namespace", ref] if ref else [])
    pull_line = shlex.join(pull)
    return {
        "curl": (f"curl -fL {token}-H 'Accept: application/octet-stream' "
                 f"-o {shlex.quote(name + '.qcow2')} {shlex.quote(image['url'])}"),
        "pull": pull_line,
        "qemu": f'qemu-system-x86_64 -m 1G -drive file="$({pull_line})",if=virtio,snapshot=on',
    }


@bp.post("/ui/images/<int:image_id>/links")
def make_link(image_id):
    """A signed link as POST /images/:id/links makes it, with its QEMU lines."""
    need("image:read")
    image = readable_image(g.viewer, image_id)
    try:
        expires_in = parse_expires_in(request.form.get("expires_in"))
    except ValidationError as error:
        return render_image(image, status=400, link={"errors": error.fields["expires_in"]})
    token, expires_at = sign_link(current_app.config["SECRET_KEY"], image, expires_in)
    url = f"{base_url()}/links/{token}/{image.name}.qcow2"
    audited("link.create", 200, image, expires_at=rfc3339(expires_at))  # never the URL
    return render_image(image, link=link_lines(url, image.name, expires_at))


def link_lines(url, name, expires_at):
    """What the page shows of a new link: the URL, its expiry, and the lines that use it."""
    fields = qemu_fields(url)
    return {"url": url, "expires_at": rfc3339(expires_at),
            "curl": f"curl -fLo {shlex.quote(name + '.qcow2')} {shlex.quote(url)}",
            "qemu_img": "qemu-img info " + shlex.quote(fields["qemu_json"]),
            "qemu": shlex.join(["qemu-system-x86_64", "-m", "1G", *fields["qemu_args"]])}


@bp.get("/ui/images/<int:image_id>/delete")
def confirm_delete(image_id):
    need("image:delete")
    image = writable_image(g.viewer, image_id)
    return render_template("delete.html", image=image_json(image, base_url()))


@bp.post("/ui/images/<int:image_id>/delete")
def delete(image_id):
    """Remove the image, as DELETE /images/:id does."""
    need("image:delete")
    image = writable_image(g.viewer, image_id)
    image_changes.delete_image(image, current_app.extensions["storage"])
    audited("delete", 303, image)
    flash(f"Deleted {image.name}.")
    return redirect(url_for("ui.index"), 303)


# --- upload ----------------------------------------------------------------------------

@bp.get("/ui/upload")
def upload_form():
    need("image:write")
    return render_template("upload.html", values={}, errors={}, token=session["token"])


@bp.post("/ui/upload")
def upload():
    """The form's file, stored by the rules of POST /images; the image's page after, or
    the form again with the reasons. The upload script gets JSON instead."""
    need("image:write")
    values = {"name": request.form.get("name", ""), "namespace": request.form.get("namespace", "")}
    try:
        image = store_upload(g.viewer, values["name"], values["namespace"].strip() or None)
    except ValidationError as error:
        if wants_json():
            return jsonify(error.fields), 400
        return render_template("upload.html", values=values, errors=error.fields,
                               token=session["token"]), 400
    page = url_for("ui.image_page", image_id=image.id)
    flash(f"Stored {image.name}.")
    status = 201 if wants_json() else 303
    uploaded(image, status)
    if wants_json():
        return jsonify(location=page), status, {"Location": page}
    return redirect(page, status)


def store_upload(user, name, namespace):
    """The `file` field of this multipart request checked and stored exactly as POST /images
    checks and stores a body (api.plan_body_upload, api.receive_image); a refusal is
    counted and audited as an upload's (the caller does it for a stored one)."""
    try:
        plan = plan_body_upload(user, name, namespace)
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise ValidationError("file", "Choose a QCOW2 image file to upload")
        image = receive_image(plan)
    except Exception as error:
        refused(error, name, namespace)
        raise
    return image


# --- errors ----------------------------------------------------------------------------

@bp.route("/ui/<path:anything>")
def no_such_page(anything):
    """An unknown page under /ui/: the UI's own 404 page, not the API's JSON."""
    raise NotFound()


def error_page(status, message, headers=None):
    """An error as a page (as JSON for the upload script); the API's headers kept, but
    for WWW-Authenticate, which a page does not answer."""
    kept = {k: v for k, v in (headers or {}).items() if k.lower() != "www-authenticate"}
    if wants_json():
        return jsonify(message=message), status, kept
    return render_template("error.html", status=status, message=message), status, kept


@bp.errorhandler(SignInNeeded)
def sign_in_needed(error):
    target = request.full_path.rstrip("?") if request.method == "GET" else None
    return redirect(url_for("ui.sign_in_form", next=target), 303)


@bp.errorhandler(CsrfRefused)
def csrf_refused(error):
    return error_page(400, "This form has expired or did not come from this site. "
                           "Go back, reload the page and try again.")


@bp.errorhandler(ApiError)
def api_error(error):
    message = NO_SUCH_PAGE if error.status == 404 else error.message
    return error_page(error.status, message, error.headers)


@bp.errorhandler(ValidationError)
def validation_error(error):
    return error_page(400, " ".join(m for ms in error.fields.values() for m in ms))


@bp.errorhandler(HTTPException)
def http_error(error):
    message = NO_SUCH_PAGE if error.code == 404 else error.description
    return error_page(error.code or 500, message)


@bp.errorhandler(StorageUnavailable)
def storage_unavailable(error):
    current_app.logger.error("image store unavailable: %s", error)
    return error_page(503, storage_unavailable_message(error), {"Retry-After": "30"})


@bp.errorhandler(Exception)
def unexpected_error(error):
    if disk_full(error):
        current_app.logger.warning("disk full: %s", error)
        return error_page(507, DISK_FULL)
    current_app.logger.exception("unhandled error in the UI")
    return error_page(500, "Something went wrong on the server.")
