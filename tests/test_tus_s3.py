"""Resumable uploads on an S3 store (moto_server on loopback): an upload's pieces are one S3
multipart upload, so that any instance can take the next piece; S3 wants parts of at least
5 MiB but the last, so a rest shorter than that waits as a small "tail" object; the image is
the completed object, under its key, nothing copied."""

import hashlib
import itertools
import json
import os

import pytest
import sample_images
from test_tus import TUS, create, head, path_of, send

from models import Image, Upload, utcnow
from s3storage import S3Storage, split_parts
from storage import MiB
from tusuploads import sweep_expired


@pytest.fixture
def app(s3_app):
    """Every fixture built on `app` (client, make_account) uses the S3 store here."""
    return s3_app


@pytest.fixture(scope="module")
def image_12m(tmp_path_factory):
    """A qcow2 image of about 12 MiB (S3's parts are of at least 5)."""
    path = sample_images.good_v3(tmp_path_factory.mktemp("s3tus"), "twelve.qcow2", size="64M")
    sample_images.write_data(path, (0, 6 * MiB))
    return sample_images.write_data(path, (6 * MiB, 6 * MiB), pattern=0x33).read_bytes()


def tails(bucket):
    return [name for name in bucket.objects() if "/uploads/" in name]


def test_split_parts_keeps_parts_of_at_least_the_unit_but_the_last():
    unit, chunk = 5, 8
    assert split_parts(3, unit, chunk, complete=False) == ([], (0, 3))  # all a tail
    assert split_parts(3, unit, chunk, complete=True) == ([(0, 3)], None)  # the last part
    assert split_parts(6, unit, chunk, complete=False) == ([(0, 6)], None)
    assert split_parts(17, unit, chunk, complete=False) == ([(0, 8), (8, 9)], None)  # 1 merged
    assert split_parts(22, unit, chunk, complete=False) == ([(0, 8), (8, 8), (16, 6)], None)
    assert split_parts(17, unit, chunk, complete=True) == ([(0, 8), (8, 8), (16, 1)], None)
    assert split_parts(0, unit, chunk, complete=False) == ([], None)


def test_small_pieces_go_up_as_one_multipart_upload(client, alice, s3_bucket, image_12m):
    path = path_of(create(client, alice, len(image_12m), name="big"))
    assert len(s3_bucket.unfinished_uploads()) == 1
    offset, piece = 0, 3 * MiB
    while offset + piece < len(image_12m):
        answer = send(client, alice, path, offset, image_12m[offset:offset + piece])
        offset += piece
        assert (answer.status_code, answer.headers["Upload-Offset"]) == (204, str(offset))
        state = json.loads(Upload.get().state)
        # parts of 5 MiB or more; what is short of that is the tail
        assert offset - state["parts_end"] < 5 * MiB
        assert len(tails(s3_bucket)) >= (offset > state["parts_end"])
    last = send(client, alice, path, offset, image_12m[offset:])
    assert last.status_code == 204, last.get_json()

    image = Image.get()
    got = s3_bucket.client.get_object(Bucket=s3_bucket.name,
                                      Key=f"images/{image.storage_key}.qcow2")["Body"].read()
    assert got == image_12m
    assert image.sha256 == hashlib.sha256(image_12m).hexdigest()
    assert s3_bucket.unfinished_uploads() == [] and tails(s3_bucket) == []


def test_two_instances_share_one_upload(make_app, make_account, s3_bucket, tmp_path, image_12m):
    """Two instances on one database and bucket, each staging on its own disk: pieces go to
    either, in turn, and the last one's instance makes the image."""
    url = f"s3://{s3_bucket.name}/images"
    one = make_app(STORAGE_URL=url, STAGING_DIR=str(tmp_path / "one")).test_client()
    two = make_app(STORAGE_URL=url, STAGING_DIR=str(tmp_path / "two")).test_client()
    alice = make_account("alice")
    path = path_of(create(one, alice, len(image_12m)))
    cuts = [0, 6 * MiB + 1, 7 * MiB, 11 * MiB, len(image_12m)]
    for number, (start, end) in enumerate(itertools.pairwise(cuts)):
        answer = send((one, two)[number % 2], alice, path, start, image_12m[start:end])
        assert answer.status_code == 204, answer.get_json()
    image = one.get(answer.headers["Image-Location"], headers=alice.headers).get_json()
    assert image["sha256"] == hashlib.sha256(image_12m).hexdigest()
    assert os.listdir(tmp_path / "one") == os.listdir(tmp_path / "two") == []


def test_an_expired_upload_is_aborted_by_the_sweep(app, client, alice, s3_bucket, image_12m):
    path = path_of(create(client, alice, len(image_12m)))
    assert send(client, alice, path, 0, image_12m[:MiB]).status_code == 204
    assert len(s3_bucket.unfinished_uploads()) == 1 and len(tails(s3_bucket)) == 1
    Upload.update(expires_at=utcnow()).execute()
    assert sweep_expired(app.extensions["storage"]) == 1
    assert s3_bucket.unfinished_uploads() == [] and tails(s3_bucket) == []
    assert head(client, alice, path).status_code == 404


def test_delete_aborts_the_multipart_upload(client, alice, s3_bucket, image_12m):
    path = path_of(create(client, alice, len(image_12m)))
    assert send(client, alice, path, 0, image_12m[:6 * MiB]).status_code == 204
    assert client.delete(path, headers={**alice.headers, **TUS}).status_code == 204
    assert s3_bucket.unfinished_uploads() == [] and s3_bucket.objects() == {}


def test_a_refused_image_leaves_nothing_in_the_bucket(client, alice, s3_bucket, tmp_path):
    data = sample_images.zeroed_refcounts(tmp_path).read_bytes()
    path = path_of(create(client, alice, len(data)))
    answer = send(client, alice, path, 0, data)
    assert answer.status_code == 400 and "file" in answer.get_json()
    assert s3_bucket.unfinished_uploads() == [] and s3_bucket.objects() == {}


def test_a_large_piece_goes_up_in_several_parts(s3_bucket, tmp_path):
    """The store's own steps: a piece larger than the part size makes several parts, the
    rest too short for a part joins the one before, and completing gives the object."""
    store = S3Storage(s3_bucket.name, "big", tmp_path / "staging", part_size=5 * MiB)
    data = os.urandom(17 * MiB)
    state = store.begin_upload("a" * 32, len(data))
    with store.upload_piece("a" * 32, state, 0) as piece:
        piece.file.write(data[:12 * MiB])
        state = piece.keep(12 * MiB, complete=False)
    assert [part["PartNumber"] for part in state["parts"]] == [1, 2]  # 5 MiB, then 7 MiB
    assert (state["parts_end"], state["tail"]) == (12 * MiB, None)
    with store.upload_piece("a" * 32, state, 12 * MiB) as piece:
        piece.file.write(data[12 * MiB:])
        state = piece.keep(5 * MiB, complete=True)
    with store.complete_upload("a" * 32, state) as finished:
        with open(finished.path, "rb") as file:
            assert file.read() == data
        key = finished.store()
    store.intents.settle(key)
    assert s3_bucket.objects() == {f"big/{key}.qcow2": len(data)}
