"""harness.py, the gunicorn launcher of the tests, bench/run.py and reliability/run.py: it
imports nothing of the app, finds the workers, starts again after a stop, and says why a
server did not start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from harness import start_server, stop_server


def test_the_harness_imports_nothing_of_the_app():
    code = ("import sys, pathlib, harness\n"
            "project = {p.stem for p in pathlib.Path('.').glob('*.py')} - {'harness'}\n"
            "assert not project & set(sys.modules), project & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_workers_are_the_masters_children_and_a_stopped_server_starts_again(tmp_path):
    server = start_server(tmp_path / "instance", {"WEB_CONCURRENCY": "2"})
    try:
        pids = server.worker_pids()
        assert len(pids) == 2
        for pid in pids:  # field 4 of /proc/PID/stat, after the command in parentheses
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            assert int(stat[1]) == server.process.pid
        port = server.port
        server.stop()
        assert server.process.returncode is not None and server.worker_pids() == []
        server.start()
        assert server.port == port and len(server.worker_pids()) == 2
        assert server.account("restarted")["Authorization"].startswith("Bearer ")
    finally:
        stop_server(server)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with pytest.raises(RuntimeError) as refused:
        start_server(tmp_path / "instance", {"DATABASE_URL": "nosuch://nowhere"})
    assert "gunicorn did not start" in str(refused.value)
    assert "nosuch" in str(refused.value)  # the worker's own complaint, from the log
    assert os.path.exists(tmp_path / "instance" / "gunicorn.log")
