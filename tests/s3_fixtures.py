"""Fixtures of S3 storage: a real S3 protocol server on loopback (moto_server from the
venv, started once a session), a new bucket for each test, and the app storing in it.

A pytest plugin of conftest.py (its `pytest_plugins`).
"""

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from harness import free_port, launch, stop_process


@dataclass
class S3Server:
    """moto_server on loopback: an S3 endpoint that boto3 talks to over HTTP as to AWS."""

    endpoint: str

    @property
    def env(self):
        """The standard variables that point boto3 (in the app or a server) at it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server from the venv on a free loopback port, for this test session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
               "-p", str(port)]
    # moto logs every request: into a file, which never fills up as a pipe would.
    process = launch(command, f"{endpoint}/", tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield S3Server(endpoint)
    finally:
        stop_process(process, timeout=10)


@dataclass
class Bucket:
    """A bucket on the S3 server, with a look at what it holds."""

    name: str
    client: object

    def objects(self, prefix=""):
        """{object name: size} of every object under prefix."""
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return {o["Key"]: o["Size"] for o in listing.get("Contents", ())}

    def unfinished_uploads(self):
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A new bucket, with the AWS_* variables set so that boto3 in the app finds it."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client = s3_server.client()
    bucket = Bucket(f"test-{secrets.token_hex(6)}", client)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    for name in bucket.objects():
        client.delete_object(Bucket=bucket.name, Key=name)
    for upload in bucket.unfinished_uploads():
        client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=bucket.name)


@pytest.fixture
def s3_app(make_app, s3_bucket):
    """The app storing image files in s3://BUCKET/images, downloads redirected."""
    return make_app(STORAGE_URL=f"s3://{s3_bucket.name}/images")

