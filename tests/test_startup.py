"""Starting the service on a brand-new instance: gunicorn's workers all at once, a busy
SQLite file, a broken secret key.

On a new SQLite file, the switch to WAL mode takes a read lock and then the write lock;
SQLite refuses the second at once ('database is locked', no busy timeout) when another
connection holds the write lock meanwhile. Workers that each made the instance ready at the
same moment hit that now and then, and one worker failing to boot stopped gunicorn.
"""

import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, procfile_command, start_server, stop_server

# A process that opens the database as the app does, once told to go on (a line on its
# stdin), and prints every SQL statement as SQLite starts it. Arguments: the database
# file, an instance folder of its own.
OPENER = r"""
import sys

import peewee

_connect = peewee.sqlite3.connect


def traced_connect(*args, **kwargs):
    connection = _connect(*args, **kwargs)
    connection.set_trace_callback(lambda sql: print("SQL", sql, flush=True))
    return connection


peewee.sqlite3.connect = traced_connect
from app import create_app

print("IMPORTED", flush=True)
sys.stdin.readline()
create_app({"DATABASE_URL": "sqlite:///" + sys.argv[1], "SECRET_KEY": "s" * 32,
            "STORAGE_URL": "file://" + sys.argv[2] + "/images"}, instance_path=sys.argv[2])
print("READY", flush=True)
"""

FAILURES = ("database is locked", "Worker failed to boot", "Traceback")


def start_opener(database, instance):
    """An OPENER process, once it has imported the app."""
    process = subprocess.Popen([sys.executable, "-c", OPENER, str(database), str(instance)],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "IMPORTED\n", process.communicate()
    return process


def read_past_first_wal_switch(process):
    """Read process's statements until it has started one after its first switch to WAL
    (so that switch has met the held lock) or until it has ended."""
    switched = False
    for line in process.stdout:
        if switched:
            return
        switched = "journal_mode" in line.lower()


def test_two_openers_of_a_new_database_wait_for_a_writer(tmp_path):
    """Two processes open a brand-new SQLite file at once while a third holds its write
    lock; once that is let go, both are ready, with the file in WAL mode."""
    database = tmp_path / "new.sqlite3"
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    openers = [start_opener(database, tmp_path / f"instance{i}") for i in range(2)]
    for opener in openers:
        opener.stdin.write("go\n")
        opener.stdin.flush()
    for opener in openers:
        read_past_first_wal_switch(opener)
    holder.execute("COMMIT")
    holder.close()
    for opener in openers:
        out, err = opener.communicate(timeout=120)
        assert opener.returncode == 0, err
        assert "READY" in out and "database is locked" not in err
    with sqlite3.connect(database) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert check.execute("SELECT count(*) FROM image").fetchone() == (0,)


@pytest.mark.parametrize("start", range(5))
def test_a_new_instance_with_four_workers_starts(tmp_path, start):
    """gunicorn from the Procfile on a brand-new instance: it serves, the master prepared
    the instance once (`database ready` is init-db's line), and no worker failed."""
    server = start_server(tmp_path / "instance", {"WEB_CONCURRENCY": "4"})
    still_running = server.process.poll() is None
    stop_server(server)
    log = (tmp_path / "instance" / "gunicorn.log").read_text(errors="replace")
    assert still_running and server.process.returncode == 0, log
    assert not [failure for failure in FAILURES if failure in log], log
    assert log.count("database ready") == 1, log


def test_gunicorn_refuses_an_empty_secret_key_file(tmp_path):
    """An empty key left in the instance folder: gunicorn stops at once, saying why."""
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "secret_key").write_text("")
    env = {**os.environ, "PORT": str(free_port()), "HOST": "127.0.0.1",
           "IMAGESTORE_INSTANCE": str(instance),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for name in ("DATABASE_URL", "STORAGE_URL", "SECRET_KEY"):
        env.pop(name, None)
    result = subprocess.run(procfile_command(), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert f"{instance / 'secret_key'} is empty" in result.stderr
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr
