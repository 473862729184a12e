"""The tus 1.0.0 routes at /uploads (API.md "Resumable uploads"): thin, as api.py's are;
the rules are in tusuploads.py."""

import json

from flask import Blueprint, Response, current_app, g, request
from werkzeug.http import http_date

import tusuploads
from auth import require_scope
from diskspace import check_room_for_upload
from errors import ApiError
from outcomes import refused, uploaded
from tusuploads import CHECKSUMS, EXTENSIONS, TUS_VERSION, Body, Limits
from uploads import body_stream, check_upload_headers, close_connection_on_error, watch_body
from urls import base_url

bp = Blueprint("tus", __name__)
PIECE_TYPE = "application/offset+octet-stream"


def storage():
    return current_app.extensions["storage"]


def limits():
    """What uploads are held to, from the app's settings."""
    config = current_app.config
    return Limits(config["MAX_IMAGE_SIZE"], config["MAX_VIRTUAL_SIZE"],
                  config["QEMU_IMG_SLOTS"], config["UPLOAD_EXPIRY"])


def empty(status, headers):
    """An answer without a body (nor a Content-Type), as tus answers."""
    response = Response(status=status, headers=headers)
    del response.headers["Content-Type"]
    return response


@bp.before_request
def check_tus_version():
    """Every request but OPTIONS says which tus it speaks; another than ours is a 412."""
    if request.method != "OPTIONS" and request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise ApiError(412, f"Precondition Failed: this server speaks tus {TUS_VERSION}; "
                            f"send Tus-Resumable: {TUS_VERSION}", {"Tus-Version": TUS_VERSION})


@bp.after_request
def tus_headers(response):
    """Tus-Resumable on every answer, and the name tus gives to 460."""
    response.headers["Tus-Resumable"] = TUS_VERSION
    if response.status_code == 460:
        response.status = "460 Checksum Mismatch"
    return response


@bp.route("/uploads", methods=["OPTIONS"])
def describe():
    """What this tus server offers; no token needed."""
    return empty(204, {"Tus-Version": TUS_VERSION, "Tus-Extension": ",".join(EXTENSIONS),
                       "Tus-Max-Size": str(current_app.config["MAX_IMAGE_SIZE"]),
                       "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})


@bp.post("/uploads", provide_automatic_options=False)
@require_scope("image:write")
def create_upload():
    """Start an upload: its length, name, namespace, quotas (and sha256) checked now; a
    refusal is counted and audited as that of a POST /images."""
    try:
        upload = _create_upload()
    except Exception as error:
        refused(error, *_named(request.headers.get("Upload-Metadata")))
        raise
    return empty(201, {"Location": f"{base_url()}/uploads/{upload.id}", "Upload-Offset": "0",
                       "Upload-Expires": http_date(upload.expires_at)})


def _create_upload():
    """The upload of this POST /uploads, made once its headers passed every check."""
    config = current_app.config
    close_connection_on_error()
    if request.content_length or "chunked" in request.headers.get("Transfer-Encoding", ""):
        raise ApiError(400, "POST /uploads takes no body (creation-with-upload is not "
                            "offered): send the file's bytes with PATCH")
    length = tusuploads.parse_length(request.headers.get("Upload-Length"), config["MAX_IMAGE_SIZE"])
    check_room_for_upload(storage(), config["MIN_FREE_SPACE"], length)
    metadata = tusuploads.parse_metadata(request.headers.get("Upload-Metadata"))
    return tusuploads.create_upload(g.user, length, metadata, storage(), limits())


def _named(text):
    """The name and namespace in an Upload-Metadata header, as far as it can be read."""
    try:
        metadata = tusuploads.parse_metadata(text)
    except ApiError:
        return None, None
    return metadata.get("name"), metadata.get("namespace")


@bp.route("/uploads/<upload_id>", methods=["HEAD"])
@require_scope("image:write")
def upload_status(upload_id):
    """Where an upload stands: its offset, and its image once done."""
    upload = tusuploads.find_upload(g.user, upload_id)
    headers = {"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length),
               "Cache-Control": "no-store", "Upload-Expires": http_date(upload.expires_at)}
    metadata = json.loads(upload.metadata)
    if metadata:
        headers["Upload-Metadata"] = tusuploads.encode_metadata(metadata)
    if upload.image_id:
        headers["Image-Location"] = f"{base_url()}/images/{upload.image_id}"
    return empty(200, headers)


@bp.route("/uploads/<upload_id>", methods=["PATCH"])
@require_scope("image:write")
def receive_piece(upload_id):
    """Take the piece at Upload-Offset; the last one makes the image. The upload is counted
    and audited when it ends: stored, or refused (the piece's file or quota)."""
    config = current_app.config
    close_connection_on_error()  # the rest of a refused piece is never read
    check_upload_headers(request, config["MAX_IMAGE_SIZE"])
    if request.mimetype != PIECE_TYPE:
        raise ApiError(415, f"Unsupported Media Type: a piece is sent as {PIECE_TYPE}")
    offset = tusuploads.parse_count(request.headers.get("Upload-Offset"), "Upload-Offset")
    checksum = tusuploads.parse_checksum(request.headers.get("Upload-Checksum"))
    check_room_for_upload(storage(), config["MIN_FREE_SPACE"], request.content_length)
    upload = tusuploads.find_upload(g.user, upload_id)
    with watch_body(request, config["BODY_READ_TIMEOUT"]) as watch:
        stream, length = body_stream(request)
        try:
            progress = tusuploads.receive_piece(g.user, upload, offset, checksum,
                                                Body(stream, length, watch), storage(),
                                                limits(), base_url())
        except tusuploads.ENDS_UPLOAD as error:  # the upload refused: counted once, here
            refused(error, upload.name, upload.namespace)
            raise
    if progress.stored:
        uploaded(progress.image, 204)
    headers = {"Upload-Offset": str(progress.upload.offset),
               "Upload-Expires": http_date(progress.upload.expires_at)}
    if progress.image is not None:
        headers["Image-Location"] = f"{base_url()}/images/{progress.image.id}"
    return empty(204, headers)


@bp.delete("/uploads/<upload_id>")
@require_scope("image:write")
def delete_upload(upload_id):
    """End an upload; its bytes are removed (an image it made stays)."""
    tusuploads.delete_upload(g.user, upload_id, storage())
    return empty(204, {})
