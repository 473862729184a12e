"""`imagestore ls`, `rm` and `link`, the one-line errors with the server's message, the exit
codes a shell script tests, and the configuration file: the command run as a subprocess
against a real gunicorn."""

import json
import os
import shlex
import subprocess

import pytest
import requests
from client_fixtures import make_disk, upload
from conftest import free_port


@pytest.fixture(scope="module")
def carol(client_server, tmp_path_factory):
    """A user of her own (so that her list holds only what these tests put there), with
    two images, `web-base` and `db-base`, in that order; (token, {name: image})."""
    token = client_server.token("carol")
    folder = tmp_path_factory.mktemp("carol")
    images = {name: upload(client_server, make_disk(folder, 1, f"{name}.qcow2"), name,
                           token=token)
              for name in ("web-base", "db-base")}
    return token, images


@pytest.fixture
def as_carol(imagestore, carol):
    imagestore.env["IMAGESTORE_TOKEN"] = carol[0]
    return imagestore


def test_ls_lists_the_images_newest_first(as_carol, carol):
    _, images = carol
    listed = as_carol("ls")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAMESPACE", "NAME", "SIZE", "CREATED"]
    assert [row.split()[:3] for row in rows] == [
        [str(images["db-base"]["id"]), "-", "db-base"],
        [str(images["web-base"]["id"]), "-", "web-base"]]


def test_ls_searches_and_answers_json(as_carol, carol):
    _, images = carol
    found = as_carol("ls", "WEB", "--json")
    assert found.returncode == 0, found.stderr
    listed, = json.loads(found.stdout)
    assert listed["url"].startswith(as_carol.env["IMAGESTORE_URL"])  # as the client asked
    assert {**listed, "url": None} == {**images["web-base"], "url": None}


def test_link_prints_the_url_and_the_qemu_lines_that_work(as_carol, carol, proxy, tmp_path):
    image = carol[1]["web-base"]
    made = as_carol("link", "web-base", "--expires-in", "600")
    assert made.returncode == 0, made.stderr
    url, qemu, qemu_img = made.stdout.splitlines()
    assert "the link expires at" in made.stderr
    assert proxy.exchanges[-1].path == f"/images/{image['id']}/links?expires_in=600"
    assert requests.get(url, timeout=30).status_code == 200  # no token needed
    program, option, drive = shlex.split(qemu)
    assert (program, option) == ("qemu-system-x86_64", "-drive")
    assert f"file.url={url}," in drive and drive.endswith(",snapshot=on")
    answer = json.loads(as_carol("link", str(image["id"]), "--json").stdout)
    assert set(answer) >= {"url", "expires_at", "qemu_json", "qemu_img_args", "qemu_args"}
    copy = subprocess.run(shlex.split(qemu_img), cwd=tmp_path, timeout=120, check=False)
    assert copy.returncode == 0
    original = tmp_path / "original.qcow2"
    original.write_bytes(requests.get(url, timeout=30).content)
    subprocess.run(["qemu-img", "compare", "-q", str(original), str(tmp_path / "web-base.qcow2")],
                   check=True, timeout=60)


def test_rm_deletes_by_name_and_then_it_is_not_found(imagestore, client_server, tmp_path):
    image = upload(client_server, make_disk(tmp_path, 1), "doomed")
    done = imagestore("rm", "doomed")
    assert (done.returncode, done.stdout) == (0, f"deleted {image['id']} doomed\n")
    again = imagestore("rm", "doomed")
    assert (again.returncode, again.stderr) == (
        4, "imagestore: no image named doomed outside namespaces\n")
    by_id = imagestore("pull", str(image["id"]))
    assert (by_id.returncode, by_id.stderr) == (4, "imagestore: 404 Not Found\n")


def test_names_are_found_in_their_namespace_only(imagestore, client_server, tmp_path):
    image = upload(client_server, make_disk(tmp_path, 1), "nsimage", namespace="team")
    outside = imagestore("pull", "nsimage")
    assert outside.returncode == 4
    inside = imagestore("link", "nsimage", "--namespace", "team", "--json")
    assert inside.returncode == 0, inside.stderr
    assert "/links/" in json.loads(inside.stdout)["url"]
    listed = imagestore("ls", "--namespace", "team", "--json")
    assert [i["id"] for i in json.loads(listed.stdout)] == [image["id"]]
    assert imagestore("rm", "nsimage", "--namespace", "team@alice").stdout == (
        f"deleted {image['id']} nsimage\n")


def test_the_server_message_and_exit_code_of_each_refusal(imagestore, client_server,
                                                           pulled_image):
    bad_request = imagestore("link", "pulled", "--expires-in", "0")
    assert (bad_request.returncode, bad_request.stderr) == (1, (
        "imagestore: 400 Bad Request: expires_in: Must be a whole number of seconds from 1 "
        "to 604800\n"))
    unknown_token = imagestore("ls", IMAGESTORE_TOKEN="not-a-token")
    assert unknown_token.returncode == 1
    assert unknown_token.stderr.startswith("imagestore: 401 Unauthorized: ")
    no_token = imagestore("ls", IMAGESTORE_TOKEN=None)
    assert no_token.returncode == 1
    assert "(no token: set IMAGESTORE_TOKEN" in no_token.stderr
    read_only = client_server.flask("token", "create", "alice", "--scope", "image:read")
    forbidden = imagestore("rm", "pulled", IMAGESTORE_TOKEN=read_only)
    assert forbidden.returncode == 1
    assert forbidden.stderr.startswith("imagestore: 403 Forbidden: ")


def test_usage_configuration_and_network_errors(imagestore):
    assert imagestore().returncode == 2
    bad_name = imagestore("pull", "no/such")
    assert (bad_name.returncode, bad_name.stderr) == (
        2, "imagestore: not an image name or id: 'no/such'\n")
    unconfigured = imagestore("ls", IMAGESTORE_URL=None)
    assert unconfigured.returncode == 2
    assert unconfigured.stderr == ("imagestore: no server configured: set IMAGESTORE_URL, or "
                                   f"url in {imagestore.home}/.config/imagestore/config.toml\n")
    port = free_port()
    down = imagestore("ls", IMAGESTORE_URL=f"http://127.0.0.1:{port}")
    assert (down.returncode, down.stderr) == (
        3, f"imagestore: http://127.0.0.1:{port}: Connection refused\n")


def write_config(client, text, mode=0o600):
    path = client.home / ".config" / "imagestore" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_the_config_file_gives_the_server_the_token_and_the_cache(imagestore, proxy,
                                                                  pulled_image):
    token = imagestore.env["IMAGESTORE_TOKEN"]
    write_config(imagestore, f'url = "{proxy.url}"\ntoken = "{token}"\n'
                 f'cache = "{imagestore.home}/vm-cache"\n')
    done = imagestore("pull", "pulled", IMAGESTORE_URL=None, IMAGESTORE_TOKEN=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{imagestore.home}/vm-cache/sha256/")
    assert done.stderr.startswith("imagestore: pulled ")
    port = free_port()
    overridden = imagestore("ls", IMAGESTORE_URL=f"http://127.0.0.1:{port}")
    assert overridden.returncode == 3  # the environment wins over the file


def test_a_bad_or_readable_config_file_is_reported(imagestore):
    path = write_config(imagestore, "url = \n")
    broken = imagestore("ls")
    assert broken.returncode == 2
    assert broken.stderr.startswith(f"imagestore: cannot read {path}: ")
    write_config(imagestore, 'colour = "blue"\n')
    assert imagestore("ls").stderr == (
        f"imagestore: {path}: unknown setting 'colour' (known: url, token, cache, retries)\n")
    write_config(imagestore, 'token = "secret"\n', mode=0o644)
    warned = imagestore("ls")
    assert warned.returncode == 0
    assert warned.stderr == (f"imagestore: warning: {path} holds a token and others can read "
                             f"it (chmod 600 {path})\n")
