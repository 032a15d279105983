"""Faults (issue 10): inject, re-run, and prove that every original row is in its table or the backup.

Long cases (several deploy_dedup.yml runs each) are marked ``slow``; CI runs them. The faults are real:
a session holding a lock, pg_terminate_backend() of the migration's backend, a server restart, the
v1 ETL started by hand, a full filesystem (tmpfs) under the dump.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from psycopg2 import sql
from test_deploy import DEPLOY, LEDGER, ledger_exists, ledger_tables, rows_of, snapshot, unique_constraints

from harness import REPO, VENV_BIN, ansible_env

MIGRATE_APP = "dedup-rollout/pg_migrate_table"
TASK_PHOTOS = "task_photos"  # 5th table of the plan: three tables are done when the run reaches it


# --------------------------------------------------------------------------- helpers


def start_deploy(lab, **extra) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "ansible-playbook"), str(DEPLOY), "-i", str(lab.inventory)]
    for k, v in extra.items():
        cmd += ["-e", f"{k}={v}"]
    return subprocess.Popen(cmd, cwd=REPO, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def migration_waiting_pid(lab, table: str = TASK_PHOTOS):
    """pid of the migration's backend while it waits for a lock on ``table`` (None otherwise)."""
    rows = lab.pg.execute(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted "
        "WHERE a.datname = %s AND a.application_name = %s AND l.relation = to_regclass(%s)",
        lab.dbname, (lab.dbname, MIGRATE_APP, f"breezeway.{table}"))
    return rows[0][0] if rows else None


def wait_until_migration_waits(lab, proc: subprocess.Popen, timeout: float = 240):
    """pid of the migration's backend once it waits for its lock; fails with the run's output otherwise."""
    end = time.time() + timeout
    while time.time() < end:
        pid = migration_waiting_pid(lab)
        if pid:
            return pid
        if proc.poll() is not None:
            raise AssertionError("the run ended before the migration waited:\n" + proc.communicate()[0][-5000:])
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    raise AssertionError("the migration never waited for its lock:\n" + proc.communicate(timeout=60)[0][-5000:])


def accounted(lab, original: dict[str, set], deploy_id: str | None = None, disjoint: bool = True) -> None:
    """Every original row is in its table or in a backup table this deploy recorded; with ``disjoint``, none in
    both (a rollback under way puts rows back before their backup table goes)."""
    runs = ledger_tables(lab, deploy_id) if ledger_exists(lab) else []
    for t in lab.tables:
        backup = next((r["backup_table"] for r in runs if r["table_name"] == t and r["backup_table"]), None)
        now = rows_of(lab, "breezeway", t)
        saved = rows_of(lab, LEDGER, backup) if backup and lab.query(
            "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (LEDGER, backup))[0][0] else set()
        assert original[t] <= now | saved, f"{t}: {len(original[t] - now - saved)} rows lost"
        if disjoint:
            assert not (now & saved), f"{t}: a row is both kept and removed"


def assert_final(lab, original, cron_before) -> str:
    """The end state of a successful deploy, whatever happened on the way."""
    assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
    cons = unique_constraints(lab)
    for t, key in lab.natural_keys.items():
        assert any(set(cols) == set(key) for _, cols in cons.get(t, set())), (t, cons.get(t))
    runs = lab.query(sql.SQL("SELECT run_id, status FROM {} WHERE kind = 'deploy'").format(
        sql.Identifier(LEDGER, "runs")))
    assert len(runs) == 1 and runs[0][1] == "succeeded", runs
    accounted(lab, original, runs[0][0])
    assert lab.crontab() == cron_before, "the ETL cron is back exactly as it was"
    assert lab.current_release().endswith("v2")
    return runs[0][0]


# --------------------------------------------------------------------------- lock wait, terminate, restart


@pytest.mark.slow
def test_locked_table_terminated_backend_and_server_restart_then_resume(lab):
    """1. A long reader holds task_photos: the run waits lock_timeout per attempt, retries, then fails naming
    the reader's pid; a writer is never stuck behind the waiting migration longer than lock_timeout.
    2. The resumed run waits on the same lock; its backend is terminated: clear failure, nothing half-done.
    3. The next resumed run waits again; the server restarts: clear failure.
    4. A plain re-run resumes the same deploy and ends correct; nothing was lost at any point."""
    original = snapshot(lab)
    cron_before = lab.crontab()
    reader = lab.conn(autocommit=False)
    with reader.cursor() as cur:  # a long-running reader: an open transaction that has read the table
        cur.execute("SELECT count(*) FROM breezeway.task_photos")
        cur.execute("SELECT pg_backend_pid()")
        reader_pid = cur.fetchone()[0]

    # 1. Bounded lock wait, then a clear failure naming the reader.
    writer_waits: list[float] = []
    stop = threading.Event()

    def writer():
        c = lab.conn()
        with c.cursor() as cur:
            cur.execute("SELECT min(id) FROM breezeway.task_photos")
            rid = cur.fetchone()[0]
            while not stop.is_set():
                if migration_waiting_pid(lab):
                    t0 = time.monotonic()
                    cur.execute("UPDATE breezeway.task_photos SET url = url WHERE id = %s", (rid,))
                    writer_waits.append(time.monotonic() - t0)
                time.sleep(0.1)
        c.close()

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    proc = start_deploy(lab, migrate_lock_timeout="2s", migrate_retries=2, migrate_retry_delay=1)
    try:
        rc, out = finish(proc)
    finally:
        stop.set()
        th.join(timeout=10)
    assert rc != 0, out[-3000:]
    assert "could not lock breezeway.task_photos after 3 attempts" in out, out[-4000:]
    assert f"pid {reader_pid} " in out, "the error names the session in the way"
    assert "PARTLY MIGRATED" in out and "rollback.yml" in out
    assert "#dedup-paused#" in lab.crontab(), "the ETL stays paused while the database is partly migrated"
    assert writer_waits, "the writer never ran while the migration waited"
    assert max(writer_waits) < 2.0 + 1.5, f"a writer waited {max(writer_waits):.1f} s behind the migration"
    print(f"\nwriter waits behind the queued migration: n={len(writer_waits)} max={max(writer_waits):.2f}s "
          f"(lock_timeout 2s)")
    done = {r["table_name"] for r in ledger_tables(lab)}
    assert {"task_requirements", "property_photos", "task_assignments"} <= done and TASK_PHOTOS not in done
    accounted(lab, original)
    deploy_id = ledger_tables(lab)[0]["run_id"]

    # 2. pg_terminate_backend() of the migration's backend while it waits for the lock. (The reader is older
    # than preflight_max_xact_age_seconds by now: preflight would refuse it; let it through to get the wait.)
    # This run shows progress while a table runs (every table counts as big): the migration runs in the
    # background and the play prints where it is, including the lock it waits for and who holds it.
    proc = start_deploy(lab, migrate_lock_timeout="120s", migrate_retries=0,
                        preflight_max_xact_age_seconds=3600, migrate_progress_min_size=0,
                        migrate_progress_interval=1)
    pid = wait_until_migration_waits(lab, proc)
    time.sleep(3)  # a few progress lines
    assert lab.pg.scalar("SELECT pg_terminate_backend(%s)", params=(pid,)) is True
    rc, out = finish(proc)
    assert rc != 0
    assert "breezeway.task_photos: step 2/" in out and f"held by pid(s) {reader_pid}" in out, out[-4000:]
    assert f"Resuming the unfinished deploy {deploy_id}" in out
    assert "the connection to the server was lost" in out, out[-4000:]
    assert "MODULE FAILURE" not in out and "Traceback" not in out, out[-4000:]
    assert "PARTLY MIGRATED" in out
    assert TASK_PHOTOS not in {r["table_name"] for r in ledger_tables(lab)}
    accounted(lab, original)

    # 3. The server restarts while the migration waits for the lock.
    proc = start_deploy(lab, migrate_lock_timeout="120s", migrate_retries=0,
                        preflight_max_xact_age_seconds=3600)
    wait_until_migration_waits(lab, proc)
    lab.pg.restart()  # ends every session, the reader's too
    rc, out = finish(proc)
    assert rc != 0
    assert "the connection to the server was lost" in out, out[-4000:]
    assert "MODULE FAILURE" not in out and "Traceback" not in out, out[-4000:]
    reader.close()
    accounted(lab, original)

    # 4. Re-run: resumes the same deploy, finishes, nothing lost.
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-4000:]
    assert f"Resuming the unfinished deploy {deploy_id}" in res.output
    assert assert_final(lab, original, cron_before) == deploy_id
    assert lab.password not in out + res.output


# --------------------------------------------------------------------------- the ETL started by hand


@pytest.mark.slow
def test_etl_started_by_hand_during_offline_migration(lab):
    """The v1 ETL (the buggy one) run by hand while the offline migration holds/awaits table locks: the
    tables it writes again get their duplicates back; the run fails clearly instead of constraining
    a dirty table, and the re-run deduplicates them again. No duplicates, nothing lost (the ETL's own
    rows included)."""
    cron_before = lab.crontab()
    blocker = lab.conn(autocommit=False)
    with blocker.cursor() as cur:  # hold task_photos so the run stops there, tables before it done
        cur.execute("LOCK TABLE breezeway.task_photos IN ACCESS SHARE MODE")
    original = snapshot(lab)
    proc = start_deploy(lab, migrate_lock_timeout="1s", migrate_retries=60, migrate_retry_delay=1)
    try:
        wait_until_migration_waits(lab, proc)
        assert "#dedup-paused#" in lab.crontab()
        etl = lab.run_etl("nashville", "tasks")  # by hand, past the paused cron: inserts into task_* again
        assert etl.tables["task_requirements"]["affected"] > 0, etl.stdout
        for t, rows in snapshot(lab).items():  # the ETL's rows count as original from now on
            original[t] |= rows
    finally:
        blocker.rollback()
        blocker.close()
    rc, out = finish(proc)
    if rc != 0:
        # The constraint step refuses the dirty table; the failure names it (not "One or more items failed").
        assert "PARTLY MIGRATED" in out and "still has" in out, out[-4000:]
        assert lab.password not in out
        res = lab.playbook(DEPLOY)
        assert res.rc == 0, res.output[-5000:]
        assert "Resuming the unfinished deploy" in res.output
    deploy_id = assert_final(lab, original, cron_before)
    removed = {r["table_name"]: r["rows_removed"] for r in ledger_tables(lab, deploy_id)}
    assert removed["task_requirements"] > 0
