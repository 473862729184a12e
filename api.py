"""The HTTP routes: thin wrappers that read the request, call the rules, shape the answer."""

import functools
import os
import time
from functools import partial

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    request,
    send_file,
)
from peewee import PeeweeException

import access
import image_changes
import image_stats
import imports
import metrics
import queries
from access import readable_image, writable_image
from auth import audit_failure, bearer_matches, require_scope, who
from digests import check_sha256, expected_sha256, repr_digest
from diskspace import check_room_for_upload, parts_short_of_space
from downloads import DISK_TYPES, JSON, file_response, negotiate
from errors import ApiError, ValidationError, disk_full, not_found
from links import link_matches, parse_expires_in, qemu_fields, read_link, sign_link
from models import db
from outcomes import audited, refused, refused_import, uploaded
from qcow2 import HEADER_READ_SIZE, ImageRefused, check_header_start, inspect_qcow2
from quotas import check_quota_early
from representations import image_json, images_json, last_modified, rfc3339
from uploads import (
    body_stream,
    check_upload_headers,
    close_connection_on_error,
    declared_length,
    receive_body,
    watch_body,
)
from urls import base_url, link_header

bp = Blueprint("api", __name__)

# The API's description, kept beside the code and checked against the routes by the tests.
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


def storage():
    return current_app.extensions["storage"]


@bp.before_app_request
def start_clock():
    """Note when the request reached the app, for its duration in /metrics."""
    g.request_started = time.perf_counter()


@bp.after_app_request
def count_request(response):
    """Count every answer by route (the URL rule, never the raw path), method and status."""
    started = g.get("request_started")
    if started is not None:
        rule = request.url_rule
        metrics.count_request(rule and rule.rule, request.method, response.status_code,
                              time.perf_counter() - started)
    return response


@bp.get("/metrics")
def metrics_text():
    """The service's figures in Prometheus text format, summed over every worker; with
    METRICS_TOKEN set, only for `Authorization: Bearer <it>`."""
    token = current_app.config["METRICS_TOKEN"]
    if token and not bearer_matches(request.headers.get("Authorization"), token):
        audit_failure(401, "Missing or wrong metrics token")
        raise ApiError(401, "Metrics need the bearer token METRICS_TOKEN",
                       {"WWW-Authenticate": 'Bearer realm="imagestore"'})
    body = metrics.render(*image_stats.read(), current_app.config["METRICS_MULTIPROC_DIR"])
    return Response(body, content_type=metrics.CONTENT_TYPE)


@bp.get("/healthz")
def healthz():
    """200 when the database answers and the store takes files, with MIN_FREE_SPACE free
    on both disks; else 503 naming what failed."""
    try:
        db.execute_sql("SELECT 1")
    except PeeweeException as error:
        status = "database disk full" if disk_full(error) else "database unavailable"
        return jsonify(status=status), 503
    try:
        short = parts_short_of_space(storage(), current_app.config["MIN_FREE_SPACE"])
        if storage().DISK_NAME not in short:
            storage().check_writable()
    except OSError as error:
        if not disk_full(error):
            return jsonify(status="storage not writable"), 503
        short = [*short, storage().DISK_NAME]
    if short:
        return jsonify(status=f"{' and '.join(short)} disk full"), 503
    return jsonify(status="ok")


@bp.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 description of this API; no token needed."""
    return send_file(OPENAPI_PATH, mimetype="application/json")


@bp.get("/images")
@require_scope("image:read")
def list_images():
    """A page of the user's images, newest first, with a Link header; name and namespace
    narrow it to exact matches."""
    page = queries.parse_page(request.args.get("page"))
    search = queries.check_search(request.args.get("search"))
    rows, has_next = access.list_page(g.user, search, page, request.args.get("name"),
                                      request.args.get("namespace"))
    return page_answer(rows, "/images", page, has_next)


@bp.get("/n/<username>/<path:path>/-/images")
@require_scope("image:read", anonymous=True)
def list_namespace_images(username, path):
    """A page of one namespace's images (not its children's), for whoever may read the
    namespace; no token needed under a public root."""
    page = queries.parse_page(request.args.get("page"))
    search = queries.check_search(request.args.get("search"))
    rows, has_next = access.namespace_page(g.user, username, path, search, page)
    return page_answer(rows, f"/n/{username}/{path}/-/images", page, has_next)


def page_answer(rows, path, page, has_next):
    """A list page's answer: its image objects, and the Link header of its neighbours
    (path: the list's own, under the base URL)."""
    base = base_url()
    response = jsonify(images_json(rows, base))
    link = link_header(base + path, request.args.items(multi=True), page, has_next)
    if link:
        response.headers["Link"] = link
    return response


def counted_upload(view):
    """Count and audit how an upload that is not stored ends: the rule that refused it,
    and the status it is answered with. A JSON body is an import from a URL, which its own
    code counts and audits (import_image)."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except Exception as error:
            if request.mimetype != "application/json":
                refused(error, request.args.get("name"), request.args.get("namespace"))
            raise

    return wrapped


@bp.post("/images")
@require_scope("image:write")
@counted_upload
def create_image():
    """Stream the body to a temporary file, inspect it, store it, record it; a JSON body
    is an import from its download_url instead."""
    if request.is_json:
        return import_image()
    close_connection_on_error()  # the rest of a refused body is never read
    plan = plan_body_upload(g.user, request.args.get("name"), request.args.get("namespace"))
    expected = expected_sha256(request.headers.get("Repr-Digest"), request.args.get("sha256"))
    image = receive_image(plan, expected)
    body = image_json(image, base_url())
    uploaded(image)
    return jsonify(body), 201, {"Location": body["url"]}


def plan_body_upload(user, name, namespace):
    """The checks of an upload before its body is read: length and type, free space, name
    and namespace (an UploadPlan), quotas. POST /images and the web UI's form share them."""
    config = current_app.config
    check_upload_headers(request, config["MAX_IMAGE_SIZE"])
    check_room_for_upload(storage(), config["MIN_FREE_SPACE"], request.content_length)
    plan = image_changes.plan_upload(user, name, namespace)
    check_quota_early(plan, declared_length(request))
    return plan


def receive_image(plan, expected_sha256=None):
    """The request's body (or its form's `file`) streamed to staging, its header vetted as
    soon as its bytes are in (the rest unread if refused), its sha256 compared with the one
    expected, qemu-img's checks, then file and row together: the stored image."""
    config = current_app.config
    max_size, max_virtual = config["MAX_IMAGE_SIZE"], config["MAX_VIRTUAL_SIZE"]
    with storage().staging() as staged, watch_body(request, config["BODY_READ_TIMEOUT"]) as watch:
        stream, length = body_stream(request)
        check_start = partial(check_header_start, file_size=length, max_virtual_size=max_virtual)
        try:
            size, sha256 = receive_body(stream, staged.file, max_size, length, watch,
                                        check_start, HEADER_READ_SIZE)
            check_sha256(expected_sha256, sha256)  # before qemu-img: a wrong file costs less
            info = inspect_qcow2(staged.path, max_virtual, config["QEMU_IMG_SLOTS"])
        except ImageRefused as refusal:
            raise ValidationError("file", refusal_message(refusal)) from None
        return image_changes.create_image(plan, storage(), staged, size, sha256, info,
                                          base_url=base_url())


def import_image():
    """POST /images with a JSON body: the image at once, its file fetched in the background."""
    close_connection_on_error()  # a body past MAX_BODY is not read to its end
    raw, stream = b"", request.stream
    while len(raw) <= imports.MAX_BODY and (piece := stream.read(imports.MAX_BODY + 1 - len(raw))):
        raw += piece
    try:
        image = imports.start_import(g.user, raw, current_app.config, base_url(), who())
    except Exception as error:
        refused_import(error, *imports.requested_fields(raw))
        raise
    body = image_json(image, base_url())
    return jsonify(body), 201, {"Location": body["url"]}


# curl -d @file sends this type, and strips every CR and LF byte from the file first.
FORM_TYPE = "application/x-www-form-urlencoded"
# curl --data-binary @file sends the same type with the file unchanged, so the hint says
# "if": a refused file sent that way is refused for what it is.
FORM_HINT = (f" (the body came as {FORM_TYPE}: if it was sent with `curl -d @file`, which "
             "removes the file's CR and LF bytes first, send it with "
             "`curl --data-binary @file` or `-T file`)")


def refusal_message(refusal):
    """Why the file was refused; for a body sent as a form, how to send it unchanged."""
    return str(refusal) + (FORM_HINT if request.mimetype == FORM_TYPE else "")


@bp.get("/images/<int:image_id>")
@require_scope("image:read", anonymous=True)
def get_image(image_id):
    """The image as JSON, or the file itself when Accept asks for a disk type; no token
    needed under a public root."""
    mimetype = negotiate(request.headers.get("Accept"))
    if mimetype is None:
        raise ApiError(406, f"Not Acceptable: ask for {JSON} or one of {', '.join(DISK_TYPES)}",
                       {"Vary": "Accept"})
    image = readable_image(g.user, image_id)
    if mimetype != JSON:
        return counted_download(send_image(image, mimetype), image, "file")
    response = jsonify(image_json(image, base_url()))
    response.vary.add("Accept")
    return response


@bp.delete("/images/<int:image_id>")
@require_scope("image:delete")
def delete_image(image_id):
    """Remove the image's row and file."""
    image = writable_image(g.user, image_id)
    image_changes.delete_image(image, storage(), base_url())
    audited("delete", 204, image)
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


@bp.post("/images/<int:image_id>/links")
@require_scope("image:read")
def create_link(image_id):
    """A signed URL that serves the file without a token until it expires."""
    expires_in = parse_expires_in(request.args.get("expires_in"))
    image = readable_image(g.user, image_id)
    imports.check_downloaded(image)
    token, expires_at = sign_link(current_app.config["SECRET_KEY"], image, expires_in)
    url = f"{base_url()}/links/{token}/{image.name}.qcow2"
    audited("link.create", 201, image, expires_at=rfc3339(expires_at))  # never the URL
    return jsonify(url=url, expires_at=rfc3339(expires_at), **qemu_fields(url)), 201


@bp.get("/links/<token>/<filename>")
def follow_link(token, filename):
    """Serve the file named by a signed link, to anyone who holds it."""
    try:
        image_id, tag = read_link(current_app.config["SECRET_KEY"], token)
    except ApiError as error:  # forged, from another key, or expired
        audit_failure(error.status, error.message)
        raise
    image = queries.find_image(image_id)
    if not link_matches(image, tag):
        raise not_found()
    mimetype = negotiate(request.headers.get("Accept"))
    response = send_image(image, mimetype if mimetype in DISK_TYPES else DISK_TYPES[1])
    return counted_download(response, image, "link")


def counted_download(response, image, via):
    """Count and audit a GET of image's file (via "file" or "link"); a HEAD reads none."""
    if request.method == "GET":
        sent = response.content_length if response.status_code in (200, 206) else 0
        metrics.count_download(via, response.status_code, sent)
        audited("download" if via == "file" else "link.use", response.status_code, image,
                bytes=sent)
    return response


def send_image(image, mimetype):
    """The download answer for image, by whichever way the storage serves files."""
    imports.check_downloaded(image)
    store = storage()
    # A store that serves downloads itself (S3 with redirects on) gets the client
    # sent there, where Range and conditionals then work. HEAD is answered here:
    # a presigned URL is signed for GET alone.
    url = request.method == "GET" and store.download_url(
        image.storage_key, f"{image.name}.qcow2", mimetype)
    if url:
        return Response(status=302, headers={"Location": url, "Vary": "Accept"})

    def open_file():
        try:
            return store.open(image.storage_key)
        except FileNotFoundError:  # deleted since the row was read: as if it never existed
            raise not_found() from None

    return file_response(
        request, open_file, size=image.size, mimetype=mimetype,
        etag=image.sha256, last_modified=last_modified(image),
        filename=f"{image.name}.qcow2", repr_digest=repr_digest(image.sha256),
    )
