"""SIGKILL of rollback.yml at each of its steps (issue 10), as one chain of interrupted re-runs.

After a complete deploy, rollback run 1 is killed while it finds the deploy; run 2 while it pauses the ETL;
run 3 while it restores the database; ... ; the last run is left alone and must end exactly like an
uninterrupted rollback. After every kill: every original row is in its table or in the deploy's backup
table, the crontab is the original or the original paused, and `current` points at a complete release.
"""

from __future__ import annotations

import pytest
from psycopg2 import sql
from test_deploy import LEDGER
from test_faults import accounted
from test_kill_deploy import check_crontab, check_release
from test_rollback import ROLLBACK, assert_rolled_back, deploy, runs, snapshot, unique_constraints

ROLLBACK_STEPS = [
    ("find the deploy", "PLAY [Find the deploy to roll back and check its backups (read-only)]", 1.5),
    ("pause the ETL", "TASK [Pause the ETL cron jobs and wait for a running ETL]", 0.5),
    ("restore the database", "TASK [Undo the deploy table by table]", 1.5),
    ("switch the ETL back", "PLAY [Switch the ETL back to the release before the deploy]", 0.5),
    ("resume the ETL", "PLAY [Resume the ETL]", 0.3),
    ("record the rollback", "PLAY [Record the rollback and release the lock]", 0.3),
    ("write the report", "PLAY [Write the report]", 0.3),
]


@pytest.mark.slow
def test_rollback_killed_at_each_step_then_finished(lab):
    original = snapshot(lab)
    cons_before = unique_constraints(lab)
    cron_before = lab.crontab()
    deploy_id = deploy(lab)
    reached = []
    for step, marker, delay in ROLLBACK_STEPS:
        killed, out = lab.run_killed_at(ROLLBACK, marker, delay)
        assert killed, f"step {step}: the re-run ended before reaching it:\n{out[-5000:]}"
        assert lab.password not in out
        lab.settle(quiet_seconds=2)  # no lock retries in these runs
        accounted(lab, {t: set(rows.values()) for t, rows in original.items()}, deploy_id, disjoint=False)
        check_crontab(lab.crontab(), cron_before)
        check_release(lab)
        reached.append(step)
    # The last kill came after the rollback was recorded: only its report was missing. Naming the deploy
    # finishes it (changed=0, the report written); without a name there is nothing left to undo, said clearly.
    res = lab.playbook(ROLLBACK, "-e", f"dedup_run_id={deploy_id}")
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    assert_rolled_back(lab, original, original, cons_before, cron_before, deploy_id)
    assert list((lab.root / "reports").rglob(f"{deploy_id}-rollback/*/report.md"))
    res = lab.playbook(ROLLBACK)
    assert res.rc == 0 and res.changed() == 0 and "Nothing to roll back" in res.output, res.output[-3000:]
    assert len([r for r in runs(lab).values() if r["kind"] == "rollback"]) == 1
    assert lab.query(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(LEDGER, "runs")))[0][0] == 2
    assert_rolled_back(lab, original, original, cons_before, cron_before, deploy_id)
    print(f"\nrollback killed at {len(reached)} steps in a row, then finished: {', '.join(reached)}")
