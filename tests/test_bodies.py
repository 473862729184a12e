"""Upload bodies that end early or come too slowly, against a real gunicorn: the client
gets an error and nothing is kept."""

import contextlib
import hashlib
import itertools
import json
import os
import socket
import time

import pytest
from conftest import files_under, read_answer, read_answers, server_with_account


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """gunicorn with a body timeout of 1 second a piece."""
    with server_with_account(tmp_path_factory.mktemp("bodies"), "sender",
                                 {"BODY_READ_TIMEOUT": "1"}) as server:
        yield server


def send_head(server, name, length):
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /images?name={name} HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: {server.headers['Authorization']}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    return sock


def stored_files(server):
    return files_under(server.instance / "images")


def test_a_body_shorter_than_its_content_length_is_refused(server, qcow2_bytes):
    """gunicorn hands a cut-off body over as if it were whole; a valid image followed by
    a closed connection used to be stored."""
    sock = send_head(server, "short", len(qcow2_bytes) + 1000)
    sock.sendall(qcow2_bytes)
    sock.shutdown(socket.SHUT_WR)
    status, _, body = read_answer(sock)
    sock.close()
    assert status == 400
    assert b"cut off" in body
    assert stored_files(server) == []


def test_a_stalled_body_is_dropped_with_408(server, qcow2_bytes):
    sock = send_head(server, "stalled", len(qcow2_bytes))
    sock.sendall(qcow2_bytes[:1000])  # then nothing more
    status, head, body = read_answer(sock)
    sock.close()
    assert status == 408
    assert b"application/json" in head
    assert b"stalled" in body
    assert stored_files(server) == []


def test_a_trickling_body_is_dropped_too(server, qcow2_bytes):
    """A few bytes a second never stall a read, yet never finish a piece in time."""
    sock = send_head(server, "trickle", len(qcow2_bytes))
    sock.setblocking(False)
    answer = b""
    for _ in range(100):  # at most 10 s of 4 bytes every 0.1 s
        try:
            sock.send(b"QFI\xfb")
        except OSError:
            break
        time.sleep(0.1)
        try:
            answer = sock.recv(4096)
            break
        except BlockingIOError:
            continue
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert stored_files(server) == []


def test_a_whole_body_at_a_normal_pace_is_stored(server, qcow2_bytes):
    sock = send_head(server, "whole", len(qcow2_bytes))
    sock.sendall(qcow2_bytes)
    status, _, _ = read_answer(sock)
    sock.close()
    assert status == 201
    assert len([f for f in stored_files(server) if f.endswith(".qcow2")]) == 1


def send_chunked(server, name, body, content_type=None):
    """POST body as it is (the chunked framing included); return (status, body)."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /images?name={name} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {server.headers['Authorization']}\r\n"
            "Transfer-Encoding: chunked\r\n")
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    sock.shutdown(socket.SHUT_WR)
    status, head, answer = read_answer(sock)
    sock.close()
    assert b"application/json" in head
    return status, json.loads(answer)


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("framing", [
    b"zz\r\n",  # not hex
    b"-5\r\n",  # negative
    b"5 5\r\n",  # a space in the size
    b"3\r\nabcXX",  # no CRLF after the chunk's bytes
    b"3;=x\r\nabc\r\n",  # an extension without a name
    b"1" * 9000,  # a size line that never ends
], ids=["bad-hex", "negative", "space", "missing-crlf", "bad-extension", "endless-line"])
def test_broken_chunked_framing_is_400_without_a_traceback(server, qcow2_bytes, framing):
    """gunicorn's chunked reader raised its own errors through request.stream: a 500 and
    a traceback in the log. The framing breaks after a whole qcow2 header was received."""
    log, kept = server.instance / "gunicorn.log", stored_files(server)
    logged = log.stat().st_size
    status, answer = send_chunked(server, "framing", chunk(qcow2_bytes[:65536]) + framing)
    assert status == 400
    assert "chunked" in answer["message"]
    assert "Traceback" not in log.read_text(errors="replace")[logged:]
    assert stored_files(server) == kept


@pytest.mark.parametrize("cut", [-100, -2, -1], ids=["in-a-chunk", "before-crlf", "in-crlf"])
def test_chunked_body_cut_off_is_400(server, qcow2_bytes, cut):
    """The body ends: in a chunk's bytes, or where the CRLF after them should be."""
    kept = stored_files(server)
    status, answer = send_chunked(server, "cut", chunk(qcow2_bytes)[:cut])
    assert (status, answer) == (400, {"message": "Upload cut off before the end of the body"})
    assert stored_files(server) == kept


def test_broken_chunked_framing_of_a_multipart_body_is_400(server, qcow2_bytes):
    """Werkzeug reads a form itself, before the upload code sees the stream."""
    form = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
            + qcow2_bytes[:1000])
    log, kept = server.instance / "gunicorn.log", stored_files(server)
    logged = log.stat().st_size
    status, answer = send_chunked(server, "form", chunk(form) + b"zz\r\n",
                                  "multipart/form-data; boundary=b")
    assert status == 400 and "chunked" in answer["message"]
    assert "Traceback" not in log.read_text(errors="replace")[logged:]
    assert stored_files(server) == kept


def test_a_whole_chunked_body_is_stored(server, qcow2_bytes):
    status, answer = send_chunked(server, "chunked", chunk(qcow2_bytes) + b"0\r\n\r\n")
    assert status == 201 and answer["size"] == len(qcow2_bytes)


def test_chunked_multipart_body_cut_off_is_400(server, qcow2_bytes):
    form = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
            + qcow2_bytes[:1000])
    kept = stored_files(server)
    status, answer = send_chunked(server, "formcut", chunk(form)[:-10],
                                  "multipart/form-data; boundary=b")
    assert (status, answer) == (400, {"message": "Upload cut off before the end of the body"})
    assert stored_files(server) == kept


def send_upload(server, data, name, chunks=None, then=b""):
    """POST data with a Content-Length, or chunked in pieces of the given sizes, then send
    `then` on the same connection; return the socket."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /images?name={name} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {server.headers['Authorization']}\r\n")
    if chunks is None:
        body = data
        head += f"Content-Length: {len(data)}\r\n"
    else:
        offsets = [0, *itertools.accumulate(chunks)]
        body = b"".join(chunk(data[a:b]) for a, b in itertools.pairwise(offsets)) + \
            chunk(data[offsets[-1]:]) + b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\n"
    # A server that answers before the end may hang up before it all went (a 413).
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(head.encode() + b"\r\n" + body + then)
    return sock


def upload_raw(server, data, name, chunks=None):
    """send_upload, then its answer: (socket, status, head, JSON body)."""
    sock = send_upload(server, data, name, chunks)
    status, head, answer = read_answer(sock)
    return sock, status, head, json.loads(answer)


@pytest.mark.parametrize("chunks", [None, (1, 70_000, 3, 1 << 20, 12_345)],
                         ids=["content-length", "chunked"])
def test_odd_sized_bodies_hash_right(server, qcow2_bytes, chunks):
    """Bodies that end anywhere in the server's buffers, in chunks that cross them: the
    stored size and sha256 are the body's (qemu-img takes bytes after an image's end)."""
    data = qcow2_bytes + os.urandom((1 << 20) + 4097)
    sock, status, _, answer = upload_raw(server, data, f"odd{bool(chunks)}", chunks)
    sock.close()
    assert status == 201, answer
    assert (answer["size"], answer["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("chunks", [None, (4096,)], ids=["content-length", "chunked"])
def test_the_next_request_on_the_connection_starts_after_the_body(server, qcow2_bytes,
                                                                  chunks):
    """The body read from gunicorn's socket, gunicorn still knows where the next request
    starts: one sent right behind the upload is answered on the same connection."""
    sock = send_upload(server, qcow2_bytes, f"next{bool(chunks)}", chunks,
                       then=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    (status, head, _), (next_status, _, next_answer) = read_answers(sock, 2)
    sock.close()
    assert (status, b"keep-alive" in head.lower()) == (201, True)
    assert (next_status, json.loads(next_answer)) == (200, {"status": "ok"})


@pytest.fixture(scope="module")
def limited(tmp_path_factory, qcow2_bytes):
    """gunicorn whose MAX_IMAGE_SIZE is the size of qcow2_bytes."""
    with server_with_account(tmp_path_factory.mktemp("limited"), "sender",
                                 {"MAX_IMAGE_SIZE": str(len(qcow2_bytes))}) as server:
        yield server


@pytest.mark.parametrize("chunks", [None, (65536,)], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_stored(limited, qcow2_bytes, chunks):
    """Werkzeug's stream, capped at MAX_CONTENT_LENGTH, refused to read at the limit even
    where the body ended there: an image of exactly MAX_IMAGE_SIZE bytes was a 413."""
    sock, status, _, answer = upload_raw(limited, qcow2_bytes, f"exact{bool(chunks)}", chunks)
    sock.close()
    assert status == 201, answer


@pytest.mark.parametrize("chunks", [None, (65536,)], ids=["content-length", "chunked"])
def test_a_body_one_byte_past_the_limit_is_413(limited, qcow2_bytes, chunks):
    sock, status, head, answer = upload_raw(limited, qcow2_bytes + b"x", "over", chunks)
    sock.close()
    assert (status, answer) == (413, {"message": f"Image larger than the limit of "
                                                 f"{len(qcow2_bytes)} bytes"})
    assert b"connection: close" in head.lower()
    assert files_under(limited.instance / "images" / ".incoming") == []
