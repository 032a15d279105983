"""SIGKILL of deploy_dedup.yml at each of its steps (issue 10), as one chain of interrupted re-runs.

Run 1 is killed in preflight; run 2 (which resumes what run 1 left) is killed while it pauses the ETL;
run 3 in the dump; ... ; the last run is left alone and must end exactly like an uninterrupted deploy.
After every kill, before the next run: every original row is in its table or in a backup table of the
deploy, the crontab is the original or the original paused by dedup-rollout (never lost or mangled), and
the ETL's `current` points at a complete release.
"""

from __future__ import annotations

import pytest
from test_deploy import DEPLOY, snapshot
from test_faults import accounted, assert_final

PAUSE_MARK = "#dedup-paused# "

# (step, a line of deploy_dedup.yml's output that starts it, seconds to wait before the kill)
DEPLOY_STEPS = [
    ("1 preflight", "PLAY [Preflight (runbook step 1)]", 2.0),
    ("2 pause the ETL", "TASK [Pause the ETL cron jobs and wait for a running ETL]", 1.0),
    ("3 pg_dump backup", "TASK [Back up the database (step 3)]", 2.5),
    ("4 migration", "TASK [migrate : Deduplicate each table", 0.3),
    ("4 constraints", "TASK [migrate : Ensure the UNIQUE constraint of each table]", 0.5),
    ("5 validation", "TASK [Validate the result (step 5)]", 2.0),
    ("6 ETL release", "TASK [Deploy the fixed ETL release (step 6)]", 2.0),
    ("7 test ETL run", "TASK [Run the ETL twice and check for duplicates (step 7)]", 3.0),
    ("8 resume the ETL", "PLAY [Resume the ETL (runbook step 8)]", 0.5),
    ("record the run", "PLAY [Record the run and release the lock]", 0.5),
    ("write the report", "PLAY [Write the report]", 0.5),
]


def check_crontab(cron: str, cron_before: str) -> None:
    """The crontab is the original, or the original with its ETL lines paused by dedup-rollout."""
    restored = "".join(line[len(PAUSE_MARK):] if line.startswith(PAUSE_MARK) else line
                       for line in cron.splitlines(keepends=True))
    assert restored == cron_before, f"crontab mangled:\n{cron}\n--- expected (unpaused) ---\n{cron_before}"


def check_release(lab) -> None:
    current = lab.current_release()
    assert current in ("releases/v1", "releases/v2"), current
    assert (lab.etl_dir / current / "run_etl.py").is_file(), f"{current} is not a complete release"


@pytest.mark.slow
def test_deploy_killed_at_each_step_then_finished(lab):
    original = snapshot(lab)
    cron_before = lab.crontab()
    reached = []
    for step, marker, delay in DEPLOY_STEPS:
        killed, out = lab.run_killed_at(DEPLOY, marker, delay)
        assert killed, f"step {step}: the re-run ended before reaching it:\n{out[-5000:]}"
        assert lab.password not in out
        lab.settle(quiet_seconds=2)  # no lock retries in these runs
        accounted(lab, original)
        check_crontab(lab.crontab(), cron_before)
        check_release(lab)
        reached.append(step)
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-5000:]
    assert_final(lab, original, cron_before)
    print(f"\nkilled at {len(reached)} steps in a row, then finished: {', '.join(reached)}")
