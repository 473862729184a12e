"""`imagestore pull` from a server that keeps its images in S3 and redirects downloads there
(moto_server on loopback, behind a LoopbackProxy of its own so that the store's bytes are
counted): S3's ETags are not sha256s, so the client follows the redirect with Range alone and
revalidates at the server, never at the store."""

from pathlib import Path
from urllib.parse import urlsplit

from client_fixtures import Client, make_disk, upload
from conftest import server_with_account
from loopback_proxy import LoopbackProxy, cut_once_after
from test_client_pull import PIECE, files


def test_a_pull_through_s3_redirects_resumes_and_revalidates_at_the_server(s3_server, s3_bucket,
                                                                           tmp_path):
    store = LoopbackProxy(urlsplit(s3_server.endpoint).port)
    env = {"STORAGE_URL": f"s3://{s3_bucket.name}/images", "AWS_ENDPOINT_URL": store.url}
    try:
        with server_with_account(tmp_path / "server", "alice", env) as server:
            disk = make_disk(tmp_path, 8)
            upload(server, disk, "ins3")
            size = disk.stat().st_size
            token = server.headers["Authorization"].removeprefix("Bearer ")
            user = Client(tmp_path / "home", server.url, token)
            store.on_response_body = cut_once_after(size * 6 // 10)
            first = user("pull", "ins3")
            assert first.returncode == 0, first.stderr
            assert Path(first.stdout.strip()).read_bytes() == disk.read_bytes()
            cut, rest = files(store.exchanges)
            assert cut.cut and rest.status == 206
            assert "if-range" not in rest.request_headers
            assert "authorization" not in rest.request_headers  # the token stays with imagestore
            assert rest.received <= size * 4 // 10 + PIECE
            count = len(store.exchanges)
            second = user("pull", "ins3")
            assert (second.returncode, second.stdout) == (0, first.stdout)
            assert store.exchanges[count:] == []
    finally:
        store.close()
