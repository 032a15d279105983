"""Faults around the backup (issue 10): the disk filling up during the dump, and rows written after a dump.

Split from test_faults.py so that the two long files run on different workers.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from test_deploy import DEPLOY, ledger_exists, ledger_tables, rows_of, snapshot, unique_constraints
from test_faults import assert_final, finish, start_deploy

from harness import REPO, require_root


@pytest.mark.slow
def test_dump_mode_refuses_to_remove_rows_written_after_the_dump(lab):
    """Backup mode dump, the run stopped mid-migration, the ETL run by hand: tables already done get new
    duplicates that are not in the dump. The re-run refuses to remove them (they would be lost) and says
    what to do; the rollback it names puts every row back."""
    cron_before = lab.crontab()
    original = snapshot(lab)
    blocker = lab.conn(autocommit=False)
    with blocker.cursor() as cur:  # hold task_photos so the run stops there, tables before it done
        cur.execute("LOCK TABLE breezeway.task_photos IN ACCESS SHARE MODE")
    try:
        rc, out = finish(start_deploy(lab, dedup_backup_mode="dump", migrate_lock_timeout="1s",
                                      migrate_retries=0))
    finally:
        blocker.rollback()
        blocker.close()
    assert rc != 0 and "PARTLY MIGRATED" in out, out[-4000:]
    deploy_id = ledger_tables(lab)[0]["run_id"]
    assert all(r["backup_table"] is None for r in ledger_tables(lab, deploy_id))
    etl = lab.run_etl("nashville", "tasks")  # by hand, past the paused cron
    assert etl.tables["task_requirements"]["affected"] > 0, etl.stdout
    for t, rows in snapshot(lab).items():  # the ETL's rows count as original from now on
        original[t] |= rows
    before = {t: rows_of(lab, "breezeway", t) for t in lab.tables}
    cron_paused = lab.crontab()

    rc, out = finish(start_deploy(lab, dedup_backup_mode="dump"))
    assert rc != 0
    flat = " ".join(out.split())
    assert "task_requirements" in flat and "duplicated again since" in flat, out[-4000:]
    assert f"rollback.yml -e dedup_run_id={deploy_id}" in flat
    assert {t: rows_of(lab, "breezeway", t) for t in lab.tables} == before, "nothing changed"
    assert lab.crontab() == cron_paused

    res = lab.playbook(REPO / "rollback.yml", "-e", f"dedup_run_id={deploy_id}")
    assert res.rc == 0, res.output[-5000:]
    for t in lab.tables:
        assert original[t] <= rows_of(lab, "breezeway", t), f"{t}: the rollback did not put everything back"
    assert lab.crontab() == cron_before, "the rollback resumed the ETL"
    # Deploying again after the rollback is the ordinary path (test_rollback.py covers rollback, then redeploy).


# --------------------------------------------------------------------------- disk full during the dump


@pytest.fixture
def tiny_fs():
    """A 64 KiB tmpfs: any real dump fills it."""
    require_root("mounting a tmpfs")
    d = Path(tempfile.mkdtemp(prefix="dedup-tinyfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


@pytest.mark.slow
def test_disk_full_during_the_dump_stops_before_the_migration(lab, tiny_fs):
    original = snapshot(lab)
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    res = lab.playbook(DEPLOY, extra_vars={"dedup_backup_dir": str(tiny_fs), "preflight_disk_reserve_bytes": 0,
                                           "preflight_dump_size_factor": 0})
    assert res.rc != 0
    assert "The backup failed, so nothing was migrated" in res.output, res.output[-4000:]
    assert "No space left on device" in res.output
    assert "Nothing was changed in" in res.output and "the ETL cron jobs are resumed" in res.output, res.output[-5000:]
    assert list(tiny_fs.iterdir()) == [], "a partial dump was left behind"
    assert lab.password not in res.output
    assert lab.counts() == counts and unique_constraints(lab) == cons
    assert lab.crontab() == cron, "the ETL was resumed exactly as it was"
    assert not ledger_exists(lab) or ledger_tables(lab) == []
    # Recovery: the same command with room for the dump finishes the (same) deploy.
    ok = lab.playbook(DEPLOY)
    assert ok.rc == 0, ok.output[-4000:]
    assert_final(lab, original, cron)
