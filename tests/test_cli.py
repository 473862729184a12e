"""The admin commands of the contract, through Flask's CLI runner."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, store_folder

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


# A CLI command in a process of its own that waits, once its app is built, for a line on
# stdin: started together, several of them then run their command at the same moment.
RUN_WHEN_TOLD = """
import sys
from app import create_app
runner = create_app().test_cli_runner()
print("ready", flush=True)
sys.stdin.readline()
result = runner.invoke(args=sys.argv[1:])
print(result.output, end="")
if result.exception and not isinstance(result.exception, SystemExit):
    print(repr(result.exception))
sys.exit(result.exit_code or (1 if result.exception else 0))
"""


def cli_env(app):
    """The environment under which a `flask` command finds this app's database and store."""
    return {**os.environ, "DATABASE_URL": app.config["DATABASE_URL"],
            "STORAGE_URL": app.config["STORAGE_URL"], "SECRET_KEY": app.config["SECRET_KEY"],
            "IMAGESTORE_INSTANCE": app.instance_path}


def run_at_once(app, commands):
    """Run each CLI command in its own process, all released at one moment; return
    (exit code, output) of each."""
    processes = [subprocess.Popen([sys.executable, "-c", RUN_WHEN_TOLD, *args], cwd=ROOT,
                                  env=cli_env(app), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for args in commands]
    try:
        for process in processes:
            assert process.stdout.readline() == "ready\n"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.close()
        return [(p.wait(timeout=120), p.stdout.read()) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow  # four Python processes at once
def test_concurrent_namespace_creates_all_succeed(app, runner):
    """`namespace create` wrote in a deferred transaction: on SQLite a process whose read
    was overtaken by another's commit failed at once with 'database is locked'."""
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    commands = [["namespace", "create", f"team/p{i}/x/y", "--owner", "alice"]
                for i in range(8)]
    results = run_at_once(app, commands)
    assert [code for code, _ in results] == [0] * 8, results
    ids = [int(output) for _, output in results]
    assert len(set(ids)) == 8
    assert Namespace.select().count() == 1 + 8 * 3
    assert {ns.root.path for ns in Namespace.select()} == {"team"}


@pytest.mark.parametrize("username", ["", " ", "a b", "al@ce", ".", "..", "a\nb", "a/b",
                                      "é", "x" * 65],
                         ids=["empty", "space", "inner-space", "at", "dot", "dotdot",
                              "newline", "slash", "accent", "65-chars"])
def test_user_create_refuses_names_that_path_at_owner_cannot_name(runner, username):
    result = runner.invoke(args=["user", "create", username, "u@example.com"])
    assert result.exit_code != 0
    assert "USERNAME" in result.output
    assert User.select().count() == 0


def test_user_create_accepts_every_username_character(runner, upload, make_account):
    name = "A.b_c-9" + "x" * 57  # 64 characters
    result = runner.invoke(args=["user", "create", name, "u@example.com"])
    assert result.exit_code == 0, result.output
    account = make_account(name)
    assert upload(account, namespace=f"team@{name}").status_code == 201


def test_user_create_refuses_a_case_twin(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    result = runner.invoke(args=["user", "create", "Alice", "b@example.com"])
    assert result.exit_code != 0 and "'alice' already exists" in result.output
    assert [u.username for u in User.select()] == ["alice"]


@pytest.mark.parametrize("email", ["", "no-at", "a@b@c", "a b@example.com", "a@example.com\n",
                                   "x" * 250 + "@a.bc"],
                         ids=["empty", "no-at", "two-ats", "space", "newline", "255-chars"])
def test_user_create_refuses_bad_email(runner, email):
    result = runner.invoke(args=["user", "create", "alice", email])
    assert result.exit_code != 0 and "EMAIL" in result.output
    assert User.select().count() == 0


@pytest.fixture
def alice_cli(runner):
    runner.invoke(args=["user", "create", "alice", "a@example.com"])
    return lambda *args: runner.invoke(args=list(args))


def test_namespace_create_again_says_it_exists_and_prints_the_id(alice_cli):
    first = alice_cli("namespace", "create", "team", "--owner", "alice",
                      "--visibility", "public")
    for same in ([], ["--visibility", "public"]):
        again = alice_cli("namespace", "create", "team", "--owner", "alice", *same)
        assert again.exit_code == 0
        assert again.stdout == first.stdout
        assert again.stderr == f"namespace team@alice (id {first.stdout.strip()}, " \
                               "visibility public) exists\n"


def test_namespace_create_again_with_another_visibility_fails_and_changes_nothing(alice_cli):
    ns_id = alice_cli("namespace", "create", "team", "--owner", "alice").stdout.strip()
    again = alice_cli("namespace", "create", "team", "--owner", "alice",
                      "--visibility", "public")
    assert again.exit_code != 0 and again.stdout == ""
    assert f"namespace team@alice (id {ns_id}, visibility private) exists; " \
           "use set-visibility to change it" in again.stderr
    assert Namespace.get().visibility == "private"


def test_namespace_create_under_a_root_of_another_visibility_fails(alice_cli):
    alice_cli("namespace", "create", "team", "--owner", "alice", "--visibility", "internal")
    child = alice_cli("namespace", "create", "team/sub", "--owner", "alice",
                      "--visibility", "public")
    assert child.exit_code != 0 and "visibility internal" in child.stderr
    assert Namespace.select().count() == 1
    inherited = alice_cli("namespace", "create", "team/sub", "--owner", "alice")
    assert inherited.exit_code == 0
    assert Namespace.get_by_id(int(inherited.stdout)).visibility == "internal"


def test_set_visibility_makes_a_public_root_private_again(
        alice_cli, client, make_account, upload):
    alice, carol = make_account("alice"), make_account("carol")
    alice_cli("namespace", "create", "team/sub", "--owner", "alice", "--visibility", "public")
    image_id = upload(alice, namespace="team/sub").json["id"]
    assert client.get(f"/images/{image_id}", headers=carol.headers).status_code == 200
    result = alice_cli("namespace", "set-visibility", "team@alice", "private")
    assert result.exit_code == 0
    assert result.stdout == "team@alice: visibility private (was public)\n"
    assert client.get(f"/images/{image_id}", headers=carol.headers).status_code == 404
    got = client.get(f"/images/{image_id}", headers=alice.headers).json
    assert got["namespace"]["visibility"] == "private"
    assert {ns.visibility for ns in Namespace.select()} == {"private"}


def test_set_visibility_refuses_a_child_and_bad_input(alice_cli):
    alice_cli("namespace", "create", "team/sub", "--owner", "alice")
    child = alice_cli("namespace", "set-visibility", "team/sub@alice", "public")
    assert child.exit_code != 0
    assert "set-visibility team@alice public" in child.stderr
    assert alice_cli("namespace", "set-visibility", "team", "public").exit_code != 0
    assert "no namespace" in alice_cli("namespace", "set-visibility", "x@alice",
                                       "public").stderr
    assert alice_cli("namespace", "set-visibility", "team@alice", "secret").exit_code != 0
    assert {ns.visibility for ns in Namespace.select()} == {"private"}


def test_upload_into_a_new_child_of_a_public_root_shows_public(alice_cli, make_account,
                                                               upload):
    alice = make_account("alice")
    alice_cli("namespace", "create", "pub", "--owner", "alice", "--visibility", "public")
    image = upload(alice, namespace="pub/new").json
    assert image["namespace"]["visibility"] == "public"
