"""Resumable uploads, tus 1.0.0 at /uploads (API.md "Resumable uploads"), through Flask's test
client on every engine: creation, pieces, checksums, expiry, termination and every refusal.

A tus client makes an upload with POST /uploads (Upload-Length, Upload-Metadata), sends the
file in pieces with PATCH (Upload-Offset, Content-Type: application/offset+octet-stream),
asks where it stands with HEAD, and may end it with DELETE. The last piece makes the image.
"""

import base64
import hashlib
import io
import threading
from pathlib import Path

import pytest
import sample_images
from conftest import local_store

import tusuploads
from config import load_config
from models import Image, Namespace, Upload, db, utcnow
from uploadlocks import upload_lock

TUS = {"Tus-Resumable": "1.0.0"}
PIECE = "application/offset+octet-stream"
MIB = 1 << 20


def metadata(**values):
    """An Upload-Metadata header: each value base64, as tus says."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items())


def create(client, account, length, **values):
    """POST /uploads for a file of length bytes; values go into Upload-Metadata."""
    values.setdefault("name", "img")
    return client.post("/uploads", headers={**account.headers, **TUS,
                                            "Upload-Length": str(length),
                                            "Upload-Metadata": metadata(**values)})


def path_of(response):
    """The upload's path, from the Location of its creation."""
    assert response.status_code == 201, response.get_json()
    return response.headers["Location"].removeprefix("http://localhost")


def send(client, account, path, offset, piece, **headers):
    """PATCH one piece at offset."""
    # The test client drops an explicit Content-Length: 0, which tus clients send.
    extra = {"environ_overrides": {"CONTENT_LENGTH": "0"}} if piece == b"" else {}
    return client.patch(path, data=piece, headers={
        **account.headers, **TUS, "Upload-Offset": str(offset), "Content-Type": PIECE,
        **headers}, **extra)


def head(client, account, path):
    return client.head(path, headers={**account.headers, **TUS})


def upload_in_pieces(client, account, data, sizes, **values):
    """Create an upload and send data in pieces of the given sizes (the rest last); return
    the upload's path and the last answer."""
    path = path_of(create(client, account, len(data), **values))
    offset = 0
    for size in [*sizes, len(data)]:
        piece = data[offset:offset + size]
        answer = send(client, account, path, offset, piece)
        if answer.status_code != 204 or offset + len(piece) == len(data):
            return path, answer
        offset += len(piece)
    return path, answer


def checksum(algorithm, piece):
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, piece).digest()).decode()}"


@pytest.fixture
def big_image(tmp_path):
    """A qcow2 image of about 3 MiB, its data in two patterns: several 1 MiB buffers long."""
    path = sample_images.good_v3(tmp_path, "big.qcow2", size="64M")
    sample_images.write_data(path, (0, 2 * MIB))
    return sample_images.write_data(path, (2 * MIB, MIB), pattern=0x5A).read_bytes()


def uploads_folder(app):
    folder = Path(local_store(app).root) / ".uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------- the happy path


def test_options_tells_the_protocol_and_its_limits_without_a_token(client, app):
    answer = client.options("/uploads")
    assert answer.status_code == 204
    assert answer.headers["Tus-Version"] == "1.0.0"
    assert answer.headers["Tus-Extension"] == "creation,termination,expiration,checksum"
    assert answer.headers["Tus-Max-Size"] == str(app.config["MAX_IMAGE_SIZE"])
    assert answer.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"


def test_an_image_sent_in_pieces_is_stored_as_post_images_stores_it(client, alice, app,
                                                                   big_image):
    sha256 = hashlib.sha256(big_image).hexdigest()
    created = create(client, alice, len(big_image), name="alpine", sha256=sha256)
    assert created.status_code == 201
    assert created.headers["Tus-Resumable"] == "1.0.0"
    assert created.headers["Upload-Expires"].endswith(" GMT")
    path = path_of(created)
    status = head(client, alice, path)
    assert (status.status_code, status.headers["Upload-Offset"],
            status.headers["Upload-Length"]) == (200, "0", str(len(big_image)))
    assert status.headers["Cache-Control"] == "no-store"

    # pieces of any size: one inside the header, one across buffers, the rest
    offset = 0
    for size in (10_000, 1_500_000):
        answer = send(client, alice, path, offset, big_image[offset:offset + size])
        offset += size
        assert (answer.status_code, answer.headers["Upload-Offset"]) == (204, str(offset))
        assert "Image-Location" not in answer.headers
    assert head(client, alice, path).headers["Upload-Offset"] == str(offset)
    last = send(client, alice, path, offset, big_image[offset:])

    assert (last.status_code, last.headers["Upload-Offset"]) == (204, str(len(big_image)))
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert (image["name"], image["size"], image["sha256"]) == ("alpine", len(big_image), sha256)
    file = client.get(f"/images/{image['id']}", headers={**alice.headers,
                                                         "Accept": "application/octet-stream"})
    assert file.data == big_image
    # The upload tells where its image is for as long as it is kept; its file became the image.
    assert head(client, alice, path).headers["Image-Location"] == last.headers["Image-Location"]
    assert uploads_folder(app) == []


def test_a_namespace_from_the_metadata_is_made_with_the_image(client, alice, qcow2_bytes):
    _, last = upload_in_pieces(client, alice, qcow2_bytes, [70_000], namespace="ci/linux")
    assert last.status_code == 204
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert image["namespace"]["path"] == "ci/linux"


def test_the_last_answer_lost_can_be_asked_for_again(client, alice, qcow2_bytes):
    """A client that never saw the last 204 sends an empty piece at the end: the same answer."""
    path, last = upload_in_pieces(client, alice, qcow2_bytes, [])
    again = send(client, alice, path, len(qcow2_bytes), b"")
    assert (again.status_code, again.headers["Image-Location"]) == (
        204, last.headers["Image-Location"])
    assert Image.select().count() == 1


def test_head_tells_the_metadata_back(client, alice, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes), name="alpine", namespace="ci"))
    assert tusuploads.parse_metadata(head(client, alice, path).headers["Upload-Metadata"]) == {
        "name": "alpine", "namespace": "ci"}


# ----------------------------------------------------------------- creation refused


@pytest.mark.parametrize(("values", "field", "message"), [
    ({"name": ""}, "name", "Name field required"),
    ({"name": "no spaces"}, "name", "Name must be 1 to 64 of a-z, A-Z, 0-9, _ and -"),
    ({"namespace": "ns@bob"}, "namespace", "Namespace permission denied"),
    ({"sha256": "abc"}, "sha256", "sha256 must be 64 hexadecimal digits"),
])
def test_creation_checks_the_metadata_as_post_images_checks_its_query(
        client, alice, bob, values, field, message):
    answer = create(client, alice, 1000, **values)
    assert (answer.status_code, answer.get_json()) == (400, {field: [message]})
    assert Upload.select().count() == 0 and Namespace.select().count() == 0


def test_a_name_taken_is_refused_at_creation(client, alice, upload):
    assert upload(alice, name="alpine").status_code == 201
    answer = create(client, alice, 1000, name="alpine")
    assert (answer.status_code, answer.get_json()) == (400, {"name": ["Name already exists"]})


def test_a_length_over_the_limit_is_413_as_for_post_images(make_app, make_account):
    app = make_app(MAX_IMAGE_SIZE=MIB)
    alice = make_account("alice")
    answer = create(app.test_client(), alice, MIB + 1)
    assert answer.status_code == 413
    assert answer.get_json() == {"message": f"Image larger than the limit of {MIB} bytes"}
    assert create(app.test_client(), alice, MIB).status_code == 201


@pytest.mark.parametrize(("headers", "message"), [
    ({"Upload-Length": None}, "Upload-Length required"),
    ({"Upload-Length": "-5"}, "Upload-Length must be a whole number of bytes"),
    ({"Upload-Metadata": "name !!!"}, "Upload-Metadata malformed"),
    ({"Upload-Metadata": "name YQ==,name Yg=="}, "Upload-Metadata malformed"),
])
def test_malformed_creation_headers_are_400(client, alice, headers, message):
    sent = {**alice.headers, **TUS, "Upload-Length": "1000", "Upload-Metadata": metadata(name="a")}
    sent.update(headers)
    answer = client.post("/uploads", headers={k: v for k, v in sent.items() if v is not None})
    assert answer.status_code == 400
    assert answer.get_json()["message"].startswith(message)


def test_an_empty_upload_is_refused_as_an_empty_body_is(client, alice):
    answer = create(client, alice, 0)
    assert answer.status_code == 400
    assert "the file is empty" in answer.get_json()["file"][0]


def test_creation_takes_no_body(client, alice):
    answer = client.post("/uploads", data=b"x" * 10, headers={
        **alice.headers, **TUS, "Upload-Length": "10", "Upload-Metadata": metadata(name="a")})
    assert answer.status_code == 400 and "send the file's bytes with PATCH" in answer.text


# ----------------------------------------------------------------- the protocol's rules


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0"])
def test_every_request_but_options_must_speak_tus_1_0_0(client, alice, version):
    headers = {**alice.headers, "Upload-Length": "10", "Upload-Metadata": metadata(name="a")}
    if version:
        headers["Tus-Resumable"] = version
    answer = client.post("/uploads", headers=headers)
    assert answer.status_code == 412
    assert answer.headers["Tus-Version"] == "1.0.0"
    assert Upload.select().count() == 0


def test_uploads_need_a_token_with_image_write(client, make_account):
    reader = make_account("reader", "image:read")
    assert client.post("/uploads", headers={**TUS, "Upload-Length": "1"}).status_code == 401
    answer = create(client, reader, 1000)
    assert answer.status_code == 403
    assert answer.headers["WWW-Authenticate"].endswith('scope="image:write"')


def test_a_piece_at_another_offset_is_409_and_changes_nothing(client, alice, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:100_000]).status_code == 204
    for offset in (0, 99_999, 100_001):
        answer = send(client, alice, path, offset, qcow2_bytes[offset:offset + 10])
        assert answer.status_code == 409
        assert "HEAD it" in answer.get_json()["message"]
    assert head(client, alice, path).headers["Upload-Offset"] == "100000"


def test_a_piece_past_the_length_is_413(client, alice, qcow2_bytes):
    path = path_of(create(client, alice, 1000))
    answer = send(client, alice, path, 0, qcow2_bytes[:1001])
    assert answer.status_code == 413
    assert answer.get_json() == {"message": "The piece runs past Upload-Length: 1000 bytes remain"}


@pytest.mark.parametrize(("headers", "status"), [
    ({"Content-Type": "application/octet-stream"}, 415),
    ({"Upload-Offset": None}, 400),
    ({"Upload-Offset": "one"}, 400),
])
def test_a_piece_needs_the_tus_type_and_an_offset(client, alice, qcow2_bytes, headers, status):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    sent = {**alice.headers, **TUS, "Upload-Offset": "0", "Content-Type": PIECE, **headers}
    answer = client.patch(path, data=qcow2_bytes[:10],
                          headers={k: v for k, v in sent.items() if v is not None})
    assert answer.status_code == status


# ----------------------------------------------------------------- checksums


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_a_piece_with_its_checksum_is_kept(client, alice, qcow2_bytes, algorithm):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    piece = qcow2_bytes[:70_000]
    answer = send(client, alice, path, 0, piece, **{"Upload-Checksum": checksum(algorithm, piece)})
    assert (answer.status_code, answer.headers["Upload-Offset"]) == (204, "70000")


def test_a_piece_that_fails_its_checksum_is_460_and_not_kept(client, alice, app, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 204
    wrong = checksum("sha256", b"something else")
    answer = send(client, alice, path, 1000, qcow2_bytes[1000:90_000], **{"Upload-Checksum": wrong})
    assert answer.status_code == 460
    assert answer.status == "460 Checksum Mismatch"
    assert head(client, alice, path).headers["Upload-Offset"] == "1000"
    [name] = uploads_folder(app)
    assert (Path(local_store(app).root) / ".uploads" / name).stat().st_size == 1000
    # and the upload goes on from there
    assert send(client, alice, path, 1000, qcow2_bytes[1000:]).status_code == 204


@pytest.mark.parametrize(("value", "message"), [
    ("md5 1B2M2Y8AsgTpgAmY7PhCfg==", "Upload-Checksum algorithm 'md5' not supported"),
    ("sha1 bm90IGEgZGlnZXN0", "Upload-Checksum malformed"),
    ("sha256", "Upload-Checksum malformed"),
])
def test_another_checksum_algorithm_or_a_malformed_one_is_400(client, alice, qcow2_bytes,
                                                             value, message):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    answer = send(client, alice, path, 0, qcow2_bytes[:10], **{"Upload-Checksum": value})
    assert answer.status_code == 400 and answer.get_json()["message"].startswith(message)
    assert head(client, alice, path).headers["Upload-Offset"] == "0"


# ----------------------------------------------------------------- owners, expiry, termination


def test_another_users_upload_is_not_found(client, alice, bob, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert head(client, bob, path).status_code == 404
    assert send(client, bob, path, 0, qcow2_bytes[:10]).status_code == 404
    assert client.delete(path, headers={**bob.headers, **TUS}).status_code == 404
    assert head(client, alice, path).status_code == 200
    assert client.head("/uploads/nothing-like-an-id", headers={**alice.headers,
                                                                **TUS}).status_code == 404


def test_an_expired_upload_is_gone_and_the_sweep_removes_it_with_its_bytes(
        client, alice, app, runner, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 204
    Upload.update(expires_at=utcnow()).execute()  # its time has come
    assert head(client, alice, path).status_code == 410
    answer = send(client, alice, path, 1000, qcow2_bytes[1000:])
    assert answer.status_code == 410 and Image.select().count() == 0

    result = runner.invoke(args=["sweep"])
    assert result.output.splitlines()[-1] == "removed 1 expired uploads"
    assert head(client, alice, path).status_code == 404
    assert uploads_folder(app) == []


def test_uploads_expire_after_upload_expiry(make_app, make_account, qcow2_bytes):
    app = make_app(UPLOAD_EXPIRY=3600)
    path = path_of(create(app.test_client(), make_account("alice"), len(qcow2_bytes)))
    upload = Upload.get_by_id(path.rsplit("/", 1)[1])
    assert upload.expires_at - upload.created_at == tusuploads.timedelta(seconds=3600)


def test_delete_ends_an_upload_and_removes_its_bytes(client, alice, app, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 204
    answer = client.delete(path, headers={**alice.headers, **TUS})
    assert answer.status_code == 204 and answer.headers["Tus-Resumable"] == "1.0.0"
    assert head(client, alice, path).status_code == 404
    assert uploads_folder(app) == [] and Upload.select().count() == 0


def test_deleting_a_done_upload_keeps_its_image(client, alice, qcow2_bytes):
    path, last = upload_in_pieces(client, alice, qcow2_bytes, [])
    assert client.delete(path, headers={**alice.headers, **TUS}).status_code == 204
    assert client.get(last.headers["Image-Location"], headers=alice.headers).status_code == 200


# ----------------------------------------------------------------- the file refused


def test_a_hostile_header_in_the_first_piece_ends_the_upload(client, alice, app, tmp_path):
    data = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    data += bytes(200_000 - len(data))  # more than the header, so the check runs on the piece
    path = path_of(create(client, alice, len(data)))
    answer = send(client, alice, path, 0, data)
    assert answer.status_code == 400
    assert "backing file" in answer.get_json()["file"][0]
    assert head(client, alice, path).status_code == 404
    assert uploads_folder(app) == [] and Upload.select().count() == 0


def test_a_header_sent_in_small_pieces_is_checked_by_the_piece_that_completes_it(
        client, alice, tmp_path):
    data = sample_images.raw(tmp_path).read_bytes()
    path = path_of(create(client, alice, len(data)))
    offset = 0
    while offset + 10_000 < 65_536:  # each piece alone is too short to judge
        assert send(client, alice, path, offset, data[offset:offset + 10_000]).status_code == 204
        offset += 10_000
    answer = send(client, alice, path, offset, data[offset:offset + 10_000])
    assert answer.status_code == 400
    assert "not in QCOW2 format" in answer.get_json()["file"][0]
    assert head(client, alice, path).status_code == 404


def test_an_image_refused_at_the_end_takes_the_upload_with_it(client, alice, app, tmp_path):
    data = sample_images.zeroed_refcounts(tmp_path).read_bytes()
    path, last = upload_in_pieces(client, alice, data, [100_000])
    assert last.status_code == 400
    assert last.get_json()["file"][0].startswith("File not a valid QCOW2 image: ")
    assert head(client, alice, path).status_code == 404
    assert Image.select().count() == 0 and uploads_folder(app) == []


def test_a_sha256_that_does_not_match_the_metadata_refuses_the_image(client, alice, app,
                                                                    qcow2_bytes):
    said = "0" * 64
    path, last = upload_in_pieces(client, alice, qcow2_bytes, [100_000], sha256=said)
    actual = hashlib.sha256(qcow2_bytes).hexdigest()
    assert (last.status_code, last.get_json()) == (400, {"file": [
        f"sha256 mismatch: the upload's sha256 is {actual}, its Upload-Metadata said {said}"]})
    assert head(client, alice, path).status_code == 404
    assert Image.select().count() == 0 and uploads_folder(app) == []


def test_a_name_taken_meanwhile_refuses_the_image_at_the_end(client, alice, upload, qcow2_bytes):
    path = path_of(create(client, alice, len(qcow2_bytes), name="alpine"))
    assert upload(alice, name="alpine").status_code == 201
    answer = send(client, alice, path, 0, qcow2_bytes)
    assert (answer.status_code, answer.get_json()) == (400, {"name": ["Name already exists"]})
    assert head(client, alice, path).status_code == 404


# ----------------------------------------------------------------- interruptions, races


def body(stream, length):
    """The environ of a request body read from stream, announced as length bytes."""
    return {"wsgi.input": stream, "CONTENT_LENGTH": str(length)}


class CutOff(io.RawIOBase):
    """A body that ends after its bytes, short of the Content-Length sent."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, view):
        return self._data.readinto(view)


def test_a_piece_cut_off_keeps_the_whole_buffers_that_came(client, alice, big_image):
    """A client's connection breaks mid-piece: what was written of the piece (in whole 1 MiB
    buffers) counts, and the client goes on from the offset HEAD tells."""
    path = path_of(create(client, alice, len(big_image)))
    sent = big_image[:MIB + 300_000]
    answer = client.patch(path, environ_overrides=body(CutOff(sent), len(big_image)), headers={
        **alice.headers, **TUS, "Upload-Offset": "0", "Content-Type": PIECE})
    assert answer.status_code == 400
    assert head(client, alice, path).headers["Upload-Offset"] == str(MIB)
    last = send(client, alice, path, MIB, big_image[MIB:])
    assert last.status_code == 204
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert image["sha256"] == hashlib.sha256(big_image).hexdigest()


def test_a_cut_off_piece_with_a_checksum_keeps_nothing(client, alice, big_image):
    path = path_of(create(client, alice, len(big_image)))
    answer = client.patch(
        path, environ_overrides=body(CutOff(big_image[:2 * MIB]), len(big_image)),
        headers={**alice.headers, **TUS, "Upload-Offset": "0", "Content-Type": PIECE,
                 "Upload-Checksum": checksum("sha1", big_image)})
    assert answer.status_code == 400
    assert head(client, alice, path).headers["Upload-Offset"] == "0"


class Held(io.RawIOBase):
    """A body whose bytes come only once `go` is set; `reading` is set when it is read."""

    def __init__(self, data):
        self._data, self.reading, self.go = io.BytesIO(data), threading.Event(), threading.Event()

    def readable(self):
        return True

    def readinto(self, view):
        self.reading.set()
        assert self.go.wait(30)
        return self._data.readinto(view)


def test_a_piece_sent_while_another_is_received_is_409(app, alice, qcow2_bytes):
    """Two requests racing on one upload: the second is refused at once, the first counts."""
    client = app.test_client()
    path = path_of(create(client, alice, len(qcow2_bytes)))
    first = Held(qcow2_bytes[:100_000])
    answers = {}

    def send_first():
        answers["first"] = app.test_client().patch(
            path, environ_overrides=body(first, 100_000),
            headers={**alice.headers, **TUS, "Upload-Offset": "0", "Content-Type": PIECE})

    thread = threading.Thread(target=send_first)
    thread.start()
    try:
        assert first.reading.wait(30)
        second = send(client, alice, path, 0, qcow2_bytes[:50_000])
        assert second.status_code == 409
        assert "another request is sending a piece" in second.get_json()["message"]
    finally:
        first.go.set()
        thread.join(30)
    assert answers["first"].status_code == 204
    assert head(client, alice, path).headers["Upload-Offset"] == "100000"


def test_a_lock_held_elsewhere_makes_a_piece_wait_its_turn(client, alice, qcow2_bytes):
    """The lock is what keeps two writers apart (another worker or instance holds it the
    same way): while it is held the piece is 409; once let go, it goes in."""
    path = path_of(create(client, alice, len(qcow2_bytes)))
    held, done = threading.Event(), threading.Event()

    def hold():  # on a thread of its own: its own database connection, as another worker's
        with upload_lock(path.rsplit("/", 1)[1]):
            held.set()
            done.wait(30)
        db.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 409
    finally:
        done.set()
        thread.join(30)
    assert send(client, alice, path, 0, qcow2_bytes[:1000]).status_code == 204


def test_a_piece_half_written_by_a_killed_worker_is_cut_back(client, alice, app, qcow2_bytes):
    """A worker killed mid-piece leaves bytes past the recorded offset in the upload's file:
    the next piece starts at the recorded offset all the same."""
    path = path_of(create(client, alice, len(qcow2_bytes)))
    assert send(client, alice, path, 0, qcow2_bytes[:100_000]).status_code == 204
    [name] = uploads_folder(app)
    with open(Path(local_store(app).root) / ".uploads" / name, "ab") as file:
        file.write(b"half a piece of something else")
    last = send(client, alice, path, 100_000, qcow2_bytes[100_000:])
    assert last.status_code == 204
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert image["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()


def test_without_a_saved_hash_state_the_file_is_hashed_at_the_end(client, alice, qcow2_bytes,
                                                                  monkeypatch):
    """Where OpenSSL's SHA256 state cannot be kept (resumablehash.AVAILABLE false), the
    finished file is read once more for its sha256."""
    monkeypatch.setattr(tusuploads, "AVAILABLE", False)
    path, last = upload_in_pieces(client, alice, qcow2_bytes, [100_000])
    assert Upload.get_by_id(path.rsplit("/", 1)[1]).hash_state is None
    image = client.get(last.headers["Image-Location"], headers=alice.headers).get_json()
    assert image["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("90m", 5400), ("2d", 172800),
                                               ("45s", 45), ("3600", 3600), ("", 86400)])
def test_upload_expiry_is_a_duration(tmp_path, text, seconds):
    assert load_config(str(tmp_path), {"UPLOAD_EXPIRY": text})["UPLOAD_EXPIRY"] == seconds


@pytest.mark.parametrize("text", ["0", "1w", "-5", "soon"])
def test_an_upload_expiry_that_is_no_duration_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match="not a duration"):
        load_config(str(tmp_path), {"UPLOAD_EXPIRY": text})
