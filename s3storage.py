"""Image files in an S3-compatible bucket (AWS, MinIO, Ceph...), behind storage.py's interface."""

import contextlib
import io
import logging
import os
import secrets
import tempfile
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import ReadFileChunk

from staging import IntentJournal, StagingArea
from storage import OBJECT_SUFFIX, MiB, StorageUnavailable, UploadGone

log = logging.getLogger(__name__)

# How boto3 says that the store failed.
BOTO_ERRORS = (BotoCoreError, ClientError, Boto3Error)


def s3_client():
    """A thread-safe S3 client, configured by boto3 from the standard AWS_* variables.

    Requests and presigned URLs use SigV4, which every AWS region and current
    S3-compatible servers take.
    On AWS itself objects are addressed as bucket.s3.REGION.amazonaws.com; any
    other endpoint (AWS_ENDPOINT_URL: MinIO, Ceph, moto) gets path-style URLs,
    which those serve without wildcard DNS.
    """
    session = boto3.session.Session()
    endpoint = urlparse(session.client("s3").meta.endpoint_url).hostname or ""
    style = "virtual" if endpoint.endswith(".amazonaws.com") else "path"
    config = Config(signature_version="s3v4", s3={"addressing_style": style},
                    connect_timeout=5, read_timeout=60,
                    retries={"mode": "standard", "max_attempts": 3})
    return session.client("s3", config=config)


class S3Reader:
    """A stored object as a readable stream; seek() starts it at an offset (a Range GET).

    The GET is made by seek() (or the first read), so that a missing object or
    an unreachable store is known before the answer's headers go out.
    """

    # FileWrapper asks for 8 KiB at a time; 1 MiB pieces cost a fifth of the CPU (docs/platform.md).
    PIECE = MiB

    def __init__(self, store, key):
        self._store, self._key = store, key
        self._body = None

    def seek(self, offset, whence=io.SEEK_SET):
        """Start reading at offset from the object's start: a new (ranged) GET."""
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("S3Reader seeks from the start only")
        self._close_body()
        self._body = self._store.get_body(self._key, offset)
        return offset

    def read(self, size=-1):
        """At least a PIECE (or size, if larger) of bytes; b'' at the end."""
        if self._body is None:
            self.seek(0)
        try:
            return self._body.read(max(size, self.PIECE) if size and size > 0 else None)
        except BOTO_ERRORS as error:
            raise StorageUnavailable(f"reading {self._key} from S3 failed: {error}") from error

    def close(self):
        """Let go of the connection (early, when a client leaves mid-download)."""
        self._close_body()

    def _close_body(self):
        if self._body is not None:
            self._body.close()
            self._body = None


class S3Storage:
    """Image files as objects in an S3-compatible bucket, under a prefix.

    Uploads are staged in a local folder (they are inspected there), then go up
    by boto3's managed transfer, in parts when large. Downloads are presigned
    URLs when redirect_downloads is on, else streamed through this app.
    """

    # How errors and /healthz name the local folder and disk that uploads are staged on.
    FOLDER_NAME = "the upload staging folder"
    DISK_NAME = "staging"
    # How long a presigned download URL may be used (seconds).
    DOWNLOAD_URL_LIFETIME = 600

    # A failed or killed upload leaves parts that cost storage; sweep() aborts
    # those older than this, which no live upload can be.
    STALE_UPLOAD = timedelta(days=1)

    def __init__(self, bucket, prefix="", staging_dir=None, redirect_downloads=True,
                 part_size=16 * MiB, concurrency=4, client=None, upload_expiry=0):
        self.bucket = bucket
        # A resumable upload's multipart upload lives as long as the upload may.
        self.stale_upload = self.STALE_UPLOAD + timedelta(seconds=upload_expiry)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.redirect_downloads = redirect_downloads
        self._staging = StagingArea(
            staging_dir or os.path.join(tempfile.gettempdir(), "imagestore-staging"),
            self.FOLDER_NAME)
        self.intents = IntentJournal(self._staging.folder, self.FOLDER_NAME)
        self.staging_folder = self._staging.folder
        self.client = client or s3_client()
        # Parts of part_size, `concurrency` at a time; s3transfer raises the part
        # size by itself when a file would need more than S3's 10,000 parts.
        self.transfer = TransferConfig(multipart_threshold=part_size,
                                       multipart_chunksize=part_size,
                                       max_concurrency=concurrency)

    @classmethod
    def from_url(cls, url, staging_dir=None, redirect_downloads=True, upload_expiry=0,
                 **options):
        """The store for s3://bucket/prefix, staging in staging_dir (else a temporary one)."""
        if not url.netloc:
            raise ValueError("STORAGE_URL s3:// needs a bucket: s3://bucket/prefix")
        return cls(url.netloc, url.path, staging_dir, redirect_downloads,
                   upload_expiry=upload_expiry)

    def staging(self):
        """A staged file for an upload, removed at the block's end unless put() took it."""
        return self._staging.staging()

    def object_name(self, key):
        """The object's name in the bucket."""
        return f"{self.prefix}{key}{OBJECT_SUFFIX}"

    def put(self, staged):
        """Upload a staged file (multipart when large) and remove it; return its new key.

        The object exists only once the upload completed: a failed multipart
        upload is aborted by the transfer manager, and nothing is left to name.
        The key is left with an intent, as LocalStorage.put leaves it.
        """
        key = secrets.token_hex(16)
        self.intents.intend(key)
        staged.file.close()
        try:
            self.client.upload_file(staged.path, self.bucket, self.object_name(key),
                                    ExtraArgs={"ContentType": "application/x-qemu-disk"},
                                    Config=self.transfer)
        except BOTO_ERRORS as error:
            self.intents.settle(key)
            raise StorageUnavailable(f"uploading to S3 failed: {error}") from error
        finally:
            staged.discard()
        return key

    def get_body(self, key, offset=0):
        """The object's bytes from offset on, as boto3's streaming body."""
        args = {"Bucket": self.bucket, "Key": self.object_name(key)}
        if offset:
            args["Range"] = f"bytes={offset}-"
        try:
            return self.client.get_object(**args)["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no object {args['Key']}") from None
        except BOTO_ERRORS as error:
            raise StorageUnavailable(f"reading {key} from S3 failed: {error}") from error

    def open(self, key):
        """A readable, seekable-once stream of the stored object."""
        return S3Reader(self, key)

    def download_url(self, key, filename, mimetype):
        """A presigned GET URL that answers with these download headers; None when
        downloads are to be streamed through this app instead."""
        if not self.redirect_downloads:
            return None
        params = {"Bucket": self.bucket, "Key": self.object_name(key),
                  "ResponseContentType": mimetype,
                  "ResponseContentDisposition": f'attachment; filename="{filename}"'}
        return self.client.generate_presigned_url("get_object", Params=params,
                                                  ExpiresIn=self.DOWNLOAD_URL_LIFETIME)

    def delete(self, key):
        """Remove a stored object; one already gone is no error (S3 says so too)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))
        except BOTO_ERRORS as error:
            raise StorageUnavailable(f"deleting {key} from S3 failed: {error}") from error

    def keys(self, older_than=0):
        """Keys of the stored objects last changed more than older_than seconds ago."""
        limit = datetime.now(UTC) - timedelta(seconds=older_than)
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                name = obj["Key"].removeprefix(self.prefix)
                if "/" not in name and name.endswith(OBJECT_SUFFIX) \
                        and obj["LastModified"] <= limit:
                    found.append(name.removesuffix(OBJECT_SUFFIX))
        return found

    def sweep(self):
        """Remove dead workers' staged files and abort day-old unfinished uploads.

        The remote part is best effort: a store that is down must not keep the
        app from starting (/healthz reports it).
        """
        removed = self._staging.sweep()
        try:
            self._abort_stale_uploads()
        except BOTO_ERRORS as error:
            log.warning("could not look for unfinished S3 uploads: %s", error)
        return removed

    def _abort_stale_uploads(self):
        limit = datetime.now(UTC) - self.stale_upload
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for upload in page.get("Uploads", ()):
                if upload["Initiated"] <= limit:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def check_writable(self):
        """Raise OSError when uploads cannot be staged or the bucket cannot be reached."""
        self._staging.check_writable()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except BOTO_ERRORS as error:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} unreachable: {error}") from error

    def free_space(self):
        """Bytes free on the disk that uploads are staged on (the bucket has no limit to ask)."""
        return self._staging.free_space()


    # ------------------------------------------------------------ resumable uploads
    #
    # An upload's pieces go to one S3 multipart upload, under the key its image will have,
    # so that any instance can take the next piece and nothing is copied at the end. S3
    # wants every part but the last to be of at least 5 MiB, and numbers parts in the
    # order they are joined: a part starting at byte p is number 1 + p // unit (unit at
    # least 5 MiB, and large enough that the upload needs at most 10,000), so that parts
    # are in order whichever request made them, and a piece sent again (after a killed
    # worker) makes the same numbers again. What is left after a piece and too short for a
    # part (a small piece) waits as a "tail" object, read back by the next piece.

    MIN_PART = 5 * MiB
    MAX_PARTS = 10_000
    # boto3's own default for its multipart uploads (s3transfer), so that S3 checks each part.
    PART_CHECKSUM = "CRC32"

    def begin_upload(self, upload_id, length):
        """A multipart upload for the image's future key; its state for the upload's row."""
        key = secrets.token_hex(16)
        with self._upload_errors("starting an upload"):
            made = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.object_name(key),
                ContentType="application/x-qemu-disk", ChecksumAlgorithm=self.PART_CHECKSUM)
        return {"key": key, "multipart": made["UploadId"],
                "unit": max(self.MIN_PART, -(-length // self.MAX_PARTS)),
                "parts": [], "parts_end": 0, "tail": None}

    @contextlib.contextmanager
    def upload_piece(self, upload_id, state, offset):
        """A staged file for the piece, holding the tail (if any) first."""
        if "multipart" not in state:  # begin_upload's state was never recorded (a crash)
            raise UploadGone(f"upload {upload_id} has no multipart upload")
        with self.staging() as staged:
            tail = offset - state["parts_end"]
            if tail:
                self._fetch_tail(state["tail"], staged.file)
            yield S3Piece(self, upload_id, state, staged, tail)

    def keep_piece(self, upload_id, state, path, total, complete):
        """Send the staged file's total bytes up as parts (and a tail); the new state."""
        spans, rest = split_parts(total, state["unit"], max(self.part_chunk, state["unit"]),
                                  complete)
        parts, start = list(state["parts"]), state["parts_end"]
        for begin, length in spans:
            parts.append(self._upload_part(state, 1 + (start + begin) // state["unit"],
                                           path, begin, length))
        tail = self._put_tail(upload_id, path, *rest) if rest else None
        return {**state, "parts": parts, "tail": tail,
                "parts_end": start + sum(length for _, length in spans)}

    @property
    def part_chunk(self):
        """The largest part sent (more than one is made of a larger piece)."""
        return self.transfer.multipart_chunksize

    def _upload_part(self, state, number, path, begin, length):
        """Send bytes begin.. of the file at path as part number; what completing needs of it."""
        with self._upload_errors("sending a part"), \
                ReadFileChunk.from_filename(path, begin, length, enable_callbacks=False) as body:
            sent = self.client.upload_part(
                Bucket=self.bucket, Key=self.object_name(state["key"]), PartNumber=number,
                UploadId=state["multipart"], Body=body, ContentLength=length,
                ChecksumAlgorithm=self.PART_CHECKSUM)
        part = {"PartNumber": number, "ETag": sent["ETag"]}
        checksum = f"Checksum{self.PART_CHECKSUM}"
        if checksum in sent:
            part[checksum] = sent[checksum]
        return part

    def _tails_prefix(self, upload_id):
        return f"{self.prefix}uploads/{upload_id}/"

    def _put_tail(self, upload_id, path, begin, length):
        """Keep bytes begin.. of the file at path as a new tail object; return its name.

        A new name each time: the row names the one that counts, and the old ones go with
        the upload (_delete_tails)."""
        name = f"{self._tails_prefix(upload_id)}{secrets.token_hex(8)}.tail"
        with self._upload_errors("keeping a piece"), \
                ReadFileChunk.from_filename(path, begin, length, enable_callbacks=False) as body:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentLength=length)
        return name

    def _fetch_tail(self, name, out):
        """Write the tail object's bytes into out."""
        with self._upload_errors("reading a piece back"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
            except self.client.exceptions.NoSuchKey:
                raise UploadGone(f"no tail object {name}") from None
            while block := body.read(MiB):
                out.write(block)

    def _delete_tails(self, upload_id):
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._tails_prefix(upload_id))
        for page in pages:
            for obj in page.get("Contents", ()):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])

    @contextlib.contextmanager
    def complete_upload(self, upload_id, state):
        """Complete the multipart upload (the object appears under its key, with an intent)
        and read it back into a staged file to inspect; removed again unless stored."""
        key, finished = state["key"], None
        self.intents.intend(key)
        try:
            with self._upload_errors("completing an upload"):
                parts = sorted(state["parts"], key=lambda part: part["PartNumber"])
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.object_name(key), UploadId=state["multipart"],
                    MultipartUpload={"Parts": parts})
            with self.staging() as staged:
                with self._upload_errors("reading a finished upload"):
                    self.client.download_fileobj(self.bucket, self.object_name(key),
                                                 staged.file, Config=self.transfer)
                finished = FinishedObject(staged, key)
                yield finished
        finally:
            if finished is None or not finished.stored:
                self._remove_unstored(key)
            with contextlib.suppress(*BOTO_ERRORS):
                self._delete_tails(upload_id)

    def _remove_unstored(self, key):
        """Remove a completed object that was not kept; left to recovery if S3 is down."""
        try:
            self.delete(key)
        except StorageUnavailable as error:
            log.warning("could not remove %s yet, recovery will: %s", key, error)
            return
        self.intents.settle(key)

    def abort_upload(self, upload_id, state):
        """Abort the multipart upload and remove its tail objects."""
        if state.get("multipart"):
            with contextlib.suppress(UploadGone), self._upload_errors("aborting an upload"):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.object_name(state["key"]),
                    UploadId=state["multipart"])
        with self._upload_errors("removing an upload's pieces"):
            self._delete_tails(upload_id)

    # What S3 answers when a multipart upload cannot go on: it was aborted or completed, or
    # the parts named are not the ones it holds.
    GONE_CODES = ("NoSuchUpload", "InvalidPart", "InvalidPartOrder", "EntityTooSmall")

    @contextlib.contextmanager
    def _upload_errors(self, what):
        """UploadGone when the multipart upload cannot go on; StorageUnavailable when S3 fails."""
        try:
            yield
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in self.GONE_CODES:
                raise UploadGone(f"{what} on S3: {error}") from error
            raise StorageUnavailable(f"{what} on S3 failed: {error}") from error
        except BOTO_ERRORS as error:
            raise StorageUnavailable(f"{what} on S3 failed: {error}") from error


def split_parts(total, unit, chunk, complete):
    """How total staged bytes go up: ([(begin, length) of each part], (begin, length) of
    the tail or None). Parts are of chunk bytes but the last, which takes a rest shorter
    than unit too (S3's minimum), unless the bytes complete the upload: then any rest is
    the last part. Bytes that are fewer than unit all wait as the tail."""
    if not total or (total < unit and not complete):
        return [], ((0, total) if total else None)
    spans, begin = [], 0
    while total - begin > chunk:
        spans.append((begin, chunk))
        begin += chunk
    rest = total - begin
    if spans and rest < unit and not complete:
        spans[-1] = (spans[-1][0], spans[-1][1] + rest)
    else:
        spans.append((begin, rest))
    return spans, None


class S3Piece:
    """A piece staged locally after the upload's tail, sent up by keep()."""

    def __init__(self, store, upload_id, state, staged, tail):
        self._store, self._upload_id, self._state = store, upload_id, state
        self._path, self._tail = staged.path, tail
        self.file = staged.file

    def keep(self, size, complete):
        """Send the tail and the piece's first size bytes up; the upload's new state."""
        return self._store.keep_piece(self._upload_id, self._state, self._path,
                                      self._tail + size, complete)


class FinishedObject:
    """A completed upload's object, read back into a staged file; store() keeps it."""

    def __init__(self, staged, key):
        self.path, self.file, self.key = staged.path, staged.file, key
        self.stored = False

    def store(self):
        """The object is in place already, under its intent: only its key is needed."""
        self.stored = True
        return self.key
