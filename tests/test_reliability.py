"""The short form of reliability/run.py: load, kill -9, disk full, slow clients, QEMU on a busy
host, database and store on a full disk, the sweep amid uploads, and silent connections,
against real gunicorn, with nothing lost and nothing left behind; and the counts of a mixed
load (metrics, quotas, the audit log) exact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
LOSSES = ("load", "kill", "diskfull", "slow", "qemubusy", "dbdiskfull", "sweep", "silent")


def short_run(*scenarios):
    """Run the short form of the scenarios; return the report and each scenario's row of
    figures, (requests, errors, lost, orphans, the row's text), asserting it passed."""
    result = subprocess.run([sys.executable, str(ROOT / "reliability" / "run.py"), "--short",
                             "--only", ",".join(scenarios)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| scenario", "| ---"))}
    assert set(rows) == set(scenarios), report
    return report, {name: (*(int(cell) for cell in row.split("|")[2:6]), row)
                    for name, row in rows.items()}


def test_the_short_reliability_run_loses_nothing():
    report, rows = short_run(*LOSSES)
    for requests, errors, lost, orphans, row in rows.values():
        assert requests > 0 or "skipped" in row, report
        assert (errors, lost, orphans) == (0, 0, 0), report
    if os.geteuid() == 0:  # root can mount the small filesystems: no skipping then
        assert "skipped" not in rows["diskfull"][4] + rows["dbdiskfull"][4], report


def test_metrics_quotas_and_audit_log_agree_with_every_answer_of_a_mixed_load():
    # Users under quotas upload (good, hostile, cut off, chunked), read and delete on 2
    # workers, one killed halfway: every answer must be what /metrics, the audit log, the
    # database and the quotas say, and no quota is ever passed.
    report, rows = short_run("counts")
    requests, errors, lost, orphans, _ = rows["counts"]
    assert requests > 0 and (errors, lost, orphans) == (0, 0, 0), report
