"""No reader ever sees a migrated table empty or half-done (issue 14, part 1).

Strategy ``replace`` rewrites a table with TRUNCATE + re-insert, and TRUNCATE is not MVCC-safe: a session whose
snapshot predates the migration's commit and that reads the table afterwards sees it empty. The snapshot guard in
sql/migrate_table.sql.j2 must catch every such session, including those queued behind the migration's own lock:
a real ``pg_dump`` (it takes its snapshot, then LOCK TABLE ... ACCESS SHARE) and a REPEATABLE READ transaction.

The interleaving is made deterministic with real sessions: a reader holds the table, the migration (the real
module through ``ansible localhost -m pg_migrate_table``) queues behind it, pg_dump and the REPEATABLE READ
transaction queue behind the migration, then the reader commits.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg2

from harness import wait_for
from modkit import pg_args, render_sql, run_adhoc, run_module

LEDGER = "dedup_rollout"
KEYS, COPIES = 300, 10
MIGRATE_APP = "dedup-rollout/pg_migrate_table"




def make_table(pg, db: str) -> None:
    pg.execute(render_sql("ledger.sql.j2", dedup_backup_schema=LEDGER), db)
    pg.execute(
        "CREATE SCHEMA app; CREATE TABLE app.items (id bigserial PRIMARY KEY, k int NOT NULL, v text);"
        f"INSERT INTO app.items (k, v) SELECT g % {KEYS}, 'v' || (g % {KEYS}) "
        f"FROM generate_series(1, {KEYS * COPIES}) g; ANALYZE app.items;"
        f"INSERT INTO {LEDGER}.runs (run_id, kind, status) VALUES ('snap', 'deploy', 'running');", db)


def migration_sql(pg, db: str, run_id: str, lock_timeout: str = "30s") -> str:
    plan = run_module("pg_dedup_plan", pg_args(pg, db, schema="app", backup_schema=LEDGER, run_id=run_id,
                                               tables=[{"name": "items", "natural_key": ["k"]}]))
    assert not plan.get("failed"), plan
    return render_sql("migrate_table.sql.j2", t=plan["tables"][0], run_id=run_id, backup_mode="table",
                  backup_schema=LEDGER, lock_timeout=lock_timeout, work_mem="64MB", maintenance_work_mem="64MB")


def start_migration(pg, db: str, text: str, results: list) -> threading.Thread:
    args = pg_args(pg, db, sql=text, schema="app", table="items", run_id="snap", retries=40, retry_delay=0.5)
    th = threading.Thread(target=lambda: results.append(run_adhoc("pg_migrate_table", args, timeout=600)),
                          daemon=True)
    th.start()
    return th


def waiting(pg, db: str, app: str) -> int | None:
    """pid of a session of application ``app`` waiting for a lock on app.items."""
    rows = pg.execute(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted "
        "WHERE a.datname = %s AND a.application_name = %s AND l.relation = 'app.items'::regclass",
        db, (db, app))
    return rows[0][0] if rows else None


def copy_rows(dump_text: str) -> int:
    """Data rows of app.items in a plain-format pg_dump."""
    lines = dump_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("COPY app.items "))
    end = lines.index("\\.", start)
    return end - start - 1


def test_queued_pg_dump_and_repeatable_read_see_the_table_whole(pg, fresh_db, tmp_path: Path):
    make_table(pg, fresh_db)
    text = migration_sql(pg, fresh_db, "snap")

    holder = pg.connect(fresh_db, autocommit=False)
    holder.cursor().execute("SELECT count(*) FROM app.items")  # ACCESS SHARE until it commits
    results: list = []
    mig = start_migration(pg, fresh_db, text, results)
    wait_for(lambda: waiting(pg, fresh_db, MIGRATE_APP), timeout=120)

    # pg_dump: takes its snapshot, then queues for ACCESS SHARE behind the migration's ACCESS EXCLUSIVE.
    env = dict(os.environ, PGPASSWORD=pg.password, PGAPPNAME="pg_dump")  # the test's own client
    dump = subprocess.Popen(
        [str(pg.bindir / "pg_dump"), "--data-only", "--table=app.items", "-h", "127.0.0.1", "-p", str(pg.port),
         "-U", pg.superuser, fresh_db],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: waiting(pg, fresh_db, "pg_dump"), timeout=60)

    # A REPEATABLE READ transaction that took its snapshot before, then reads the table (queued as well).
    rr = psycopg2.connect(**pg.dsn(fresh_db), application_name="rr_reader")
    rr.set_session(isolation_level="REPEATABLE READ")
    rr_cur = rr.cursor()
    rr_cur.execute("SELECT count(*) FROM pg_class")  # the transaction's snapshot is taken here
    rr_seen: list = []
    reader = threading.Thread(target=lambda: (rr_cur.execute("SELECT count(*) FROM app.items"),
                                              rr_seen.append(rr_cur.fetchone()[0])), daemon=True)
    reader.start()
    wait_for(lambda: waiting(pg, fresh_db, "rr_reader"), timeout=60)

    holder.commit()  # the migration gets its lock with both readers queued behind it
    out, err = dump.communicate(timeout=300)
    assert dump.returncode == 0, err
    reader.join(timeout=300)
    assert rr_seen == [KEYS * COPIES], f"the REPEATABLE READ transaction saw {rr_seen} rows"
    assert copy_rows(out) == KEYS * COPIES, "pg_dump started during the migration did not dump the whole table"
    rr.commit()
    rr.close()
    holder.close()

    mig.join(timeout=600)
    result, proc = results[0]
    assert result.get("changed") and "ledger" in result, proc.stdout[-3000:]
    assert result["attempts"] > 1  # the guard rolled back while the old snapshots were there, then went on
    assert pg.scalar("SELECT count(*) FROM app.items", fresh_db) == KEYS
    assert pg.scalar(f"SELECT rows_removed FROM {LEDGER}.table_runs WHERE run_id = 'snap'", fresh_db) \
        == KEYS * (COPIES - 1)


def test_an_old_snapshot_that_stays_fails_clearly_and_changes_nothing(pg, fresh_db):
    make_table(pg, fresh_db)
    text = migration_sql(pg, fresh_db, "snap", lock_timeout="1s")
    rr = psycopg2.connect(**pg.dsn(fresh_db), application_name="nightly_report")
    rr.set_session(isolation_level="REPEATABLE READ")
    rr.cursor().execute("SELECT count(*) FROM pg_class")  # holds a snapshot, idle in transaction
    try:
        args = pg_args(pg, fresh_db, sql=text, schema="app", table="items", run_id="snap", retries=2,
                       retry_delay=0.2)
        t0 = time.monotonic()
        result, proc = run_adhoc("pg_migrate_table", args, timeout=300)
        assert "FAILED" in proc.stdout, proc.stdout[-3000:]
        msg = result["msg"]
        assert "nightly_report" in msg and "snapshot older than" in msg and "preflight_strategy: delete" in msg
        assert result["attempts"] == 3
        assert time.monotonic() - t0 < 120
    finally:
        rr.rollback()
        rr.close()
    assert pg.scalar("SELECT count(*) FROM app.items", fresh_db) == KEYS * COPIES
    assert pg.scalar(f"SELECT count(*) FROM {LEDGER}.table_runs", fresh_db) == 0


def test_a_snapshot_taken_while_the_table_is_rewritten_is_caught_before_the_commit(pg, fresh_db):
    """The guard runs again just before the commit: a REPEATABLE READ transaction that began after the first
    check (the migration holds the lock) and then reads the table must not see it empty."""
    make_table(pg, fresh_db)
    text = migration_sql(pg, fresh_db, "snap")
    # A pause inside the transaction, after the reload and before the final check, to open the window on purpose.
    text = text.replace("-- @step snapshot_recheck", "-- @step pause\nSELECT pg_sleep(2);\n-- @step snapshot_recheck")
    assert "-- @step pause" in text
    results: list = []
    mig = start_migration(pg, fresh_db, text, results)

    def in_pause():
        return pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s "
                         "AND query LIKE %s", fresh_db, (fresh_db, MIGRATE_APP, '%"step": "pause"%'))

    wait_for(in_pause, timeout=120)
    rr = psycopg2.connect(**pg.dsn(fresh_db), application_name="rr_reader")
    rr.set_session(isolation_level="REPEATABLE READ")
    cur = rr.cursor()
    cur.execute("SELECT count(*) FROM pg_class")  # snapshot taken while the table is being rewritten
    cur.execute("SET lock_timeout = '120s'")
    cur.execute("SELECT count(*) FROM app.items")  # waits for the migration's lock, then reads
    seen = cur.fetchone()[0]
    rr.commit()
    rr.close()
    assert seen == KEYS * COPIES, f"a snapshot taken during the rewrite saw {seen} rows"
    mig.join(timeout=600)
    result, proc = results[0]
    assert result.get("changed") and result["attempts"] > 1, proc.stdout[-3000:]
    assert pg.scalar("SELECT count(*) FROM app.items", fresh_db) == KEYS
