"""Image files in an S3-compatible bucket (AWS, MinIO, Ceph...), behind storage.py's interface."""

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

from staging import IntentJournal, StagingArea
from storage import OBJECT_SUFFIX, MiB, StorageUnavailable

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
                 part_size=16 * MiB, concurrency=4, client=None):
        self.bucket = bucket
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
    def from_url(cls, url, staging_dir=None, redirect_downloads=True, **options):
        """The store for s3://bucket/prefix, staging in staging_dir (else a temporary one)."""
        if not url.netloc:
            raise ValueError("STORAGE_URL s3:// needs a bucket: s3://bucket/prefix")
        return cls(url.netloc, url.path, staging_dir, redirect_downloads)

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
        limit = datetime.now(UTC) - self.STALE_UPLOAD
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

