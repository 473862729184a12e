"""The short form of reliability/run.py: load, kill -9, disk full, slow clients, QEMU on a busy
host, database and store on a full disk, the sweep amid uploads, and silent connections,
against real gunicorn, with nothing lost and nothing left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_short_reliability_run_loses_nothing():
    result = subprocess.run([sys.executable, str(ROOT / "reliability" / "run.py"), "--short"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| scenario", "| ---"))}
    assert set(rows) == {"load", "kill", "diskfull", "slow", "qemubusy", "dbdiskfull", "sweep",
                         "silent"}, report
    for row in rows.values():
        requests, errors, lost, orphans = (int(cell) for cell in row.split("|")[2:6])
        assert requests > 0 or "skipped" in row, report
        assert (errors, lost, orphans) == (0, 0, 0), report
    if os.geteuid() == 0:  # root can mount the small filesystems: no skipping then
        assert "skipped" not in rows["diskfull"] + rows["dbdiskfull"], report
