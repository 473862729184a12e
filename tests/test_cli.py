"""The admin commands of the contract, through Flask's CLI runner."""

from conftest import store_folder

from auth import hash_token
from models import Collaborator, Namespace, Token, User


def test_user_create_prints_id(runner):
    result = runner.invoke(args=["user", "create", "alice", "alice@example.com"])
    assert result.exit_code == 0
    assert result.output.strip() == str(User.get(User.username == "alice").id)


def test_user_create_twice_fails_cleanly(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    result = runner.invoke(args=["user", "create", "alice", "a@example.com"])
    assert result.exit_code != 0 and "already exists" in result.output


def test_token_create_prints_only_the_token_which_works(runner, client):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    result = runner.invoke(args=["token", "create", "alice", "--scope",
                                 "image:read image:write", "--name", "ci"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 1
    token = lines[0]
    stored = Token.get(Token.token_hash == hash_token(token))
    assert (stored.name, stored.scopes) == ("ci", "image:read,write")
    assert client.get("/images", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_token_create_refuses_bad_scope_and_unknown_user(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    bad = runner.invoke(args=["token", "create", "alice", "--scope", "image:admin"])
    assert bad.exit_code != 0 and "admin" in bad.output
    nobody = runner.invoke(args=["token", "create", "nobody", "--scope", "image:read"])
    assert nobody.exit_code != 0 and "nobody" in nobody.output
    assert Token.select().count() == 0


def test_token_list_never_shows_secrets(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    secret = runner.invoke(args=["token", "create", "alice", "--scope", "image:read",
                                 "--name", "laptop"]).output.strip()
    listing = runner.invoke(args=["token", "list", "alice"]).output
    token_id, name, scopes, created = listing.strip().split("\t")
    assert (name, scopes) == ("laptop", "image:read")
    assert int(token_id) == Token.get().id and created.endswith("Z")
    assert secret not in listing and hash_token(secret) not in listing


def test_namespace_create_and_add_collaborator(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    runner.invoke(args=["user", "create", "bob", "b@example.com"])
    result = runner.invoke(args=["namespace", "create", "team/sub", "--owner", "alice",
                                 "--visibility", "public"])
    assert result.exit_code == 0
    sub = Namespace.get_by_id(int(result.output))
    assert sub.path == "team/sub" and sub.root.path == "team"
    result = runner.invoke(args=["namespace", "add-collaborator", "team/sub@alice", "bob"])
    assert result.exit_code == 0
    collaborator = Collaborator.get()
    assert collaborator.namespace_id == sub.root_id
    assert collaborator.user.username == "bob"


def test_namespace_commands_refuse_bad_input(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    bad = runner.invoke(args=["namespace", "create", "a//b", "--owner", "alice"])
    assert bad.exit_code != 0 and "segments" in bad.output
    missing = runner.invoke(args=["namespace", "add-collaborator", "none@alice", "alice"])
    assert missing.exit_code != 0 and "no namespace" in missing.output
    assert Namespace.select().count() == 0


def test_init_db_is_idempotent(runner):
    assert runner.invoke(args=["init-db"]).exit_code == 0
    assert runner.invoke(args=["init-db"]).output.strip() == "database ready"


def test_sweep_removes_orphans_and_dead_temp_files(app, runner, alice, upload, store_files):
    import os
    storage = app.extensions["storage"]
    kept = upload(alice).json
    orphan = os.path.join(store_folder(app), "deadbeef.qcow2")
    open(orphan, "wb").close()
    # A temporary file of a process that no longer exists (pid far above pid_max).
    dead_temp = os.path.join(storage.staging_folder, "999999999-abc.part")
    open(dead_temp, "wb").close()
    result = runner.invoke(args=["sweep", "--min-age", "0"])
    assert result.exit_code == 0
    assert result.output.strip() == "removed 1 temporary files and 1 orphan files"
    assert store_files() == [f"{storage_key(kept['id'])}.qcow2"]


def storage_key(image_id):
    from models import Image
    return Image.get_by_id(image_id).storage_key
