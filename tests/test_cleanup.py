"""Backup cleanup: library/pg_backup_cleanup.py on a small ledger, and playbooks/cleanup.yml on a deployed lab.

Real parts only: the harness cluster, the real ledger SQL (sql/ledger.sql.j2, sql/monitor_checks.sql.j2),
a real deploy and the real ansible-playbook. The clock is injected (``now`` / ``dedup_now``).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from psycopg2 import sql

from harness import REPO
from modkit import pg_args, render_sql, run_module

DEPLOY = REPO / "deploy_dedup.yml"
MONITOR = REPO / "playbooks" / "monitor.yml"
CLEANUP = REPO / "playbooks" / "cleanup.yml"
LEDGER = "dedup_rollout"
RUN = "20251202T100000Z"
FINISHED = dt.datetime(2025, 12, 2, 10, 30, tzinfo=dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")




# --------------------------------------------------------------------------- the module on a small ledger


@pytest.fixture
def ledger(pg, fresh_db):
    """A database with the real ledger, a succeeded deploy of two tables and their backup tables."""
    pg.execute(render_sql("ledger.sql.j2", dedup_backup_schema=LEDGER), fresh_db)
    pg.execute(render_sql("monitor_checks.sql.j2", dedup_backup_schema=LEDGER), fresh_db)
    pg.execute(
        "INSERT INTO dedup_rollout.runs (run_id, kind, status, backup_mode, dump_path, dump_host, started_at, "
        "finished_at) VALUES (%s, 'deploy', 'succeeded', 'table', '/nowhere/x.dump', 'lab-db', %s, %s)",
        fresh_db, (RUN, FINISHED - dt.timedelta(minutes=30), FINISHED))
    for table in ("alpha", "beta"):
        backup = f"{table}__{RUN}"
        pg.execute(sql.SQL("CREATE TABLE {} AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 3000) g")
                   .format(sql.Identifier(LEDGER, backup)), fresh_db)
        pg.execute("INSERT INTO dedup_rollout.table_runs (run_id, schema_name, table_name, natural_key, keep, "
                   "order_by, status, backup_mode, backup_table) VALUES (%s, 'breezeway', %s, %s, 'oldest', 'id', "
                   "'constrained', 'table', %s)", fresh_db, (RUN, table, ["k1", "k2"], backup))
    pg.execute("CREATE TABLE dedup_rollout.unrelated (id int)", fresh_db)
    return fresh_db


def add_check(pg, db, at: dt.datetime, clean: bool = True, problems=()):
    pg.execute("INSERT INTO dedup_rollout.monitor_checks (deploy_run_id, checked_at, source, clean, problems) "
               "VALUES (%s, %s, 'playbook', %s, %s)", db, (RUN, at, clean, list(problems)))


def plan(pg, db, now: dt.datetime, **kw):
    out = run_module("pg_backup_cleanup", pg_args(pg, db, state="planned", now=iso(now), **kw))
    assert not out.get("failed"), out
    assert out["changed"] is False
    return out


def test_refusals_until_retention_and_a_clean_recent_check(pg, ledger):
    db = ledger
    before = plan(pg, db, FINISHED + dt.timedelta(days=2))
    assert before["deploy"]["run_id"] == RUN and before["allowed"] is False
    assert [b["backup_table"] for b in before["backup_tables"]] == [f"alpha__{RUN}", f"beta__{RUN}"]
    assert before["backup_bytes"] == sum(b["bytes"] for b in before["backup_tables"]) > 0
    assert before["retention_ends"] == iso(FINISHED + dt.timedelta(days=7))
    assert any("retention of 7 days has not passed" in r for r in before["refusals"])
    assert any("no monitoring check" in r for r in before["refusals"])

    later = FINISHED + dt.timedelta(days=8)
    assert [r for r in plan(pg, db, later)["refusals"] if "retention" in r] == []
    add_check(pg, db, later - dt.timedelta(hours=1), clean=False, problems=["breezeway.alpha: 2 duplicate rows"])
    dirty = plan(pg, db, later)
    assert dirty["refusals"] == [dirty["refusals"][0]] and "was not clean: breezeway.alpha" in dirty["refusals"][0]
    add_check(pg, db, later - dt.timedelta(hours=60))  # clean but older than the unclean one: still unclean
    assert plan(pg, db, later)["allowed"] is False
    add_check(pg, db, later - dt.timedelta(minutes=5))
    ok = plan(pg, db, later)
    assert ok["allowed"] is True and ok["refusals"] == [] and ok["last_check"]["clean"] is True
    stale = plan(pg, db, later + dt.timedelta(days=3))
    assert any("older than 48 hours" in r for r in stale["refusals"])
    assert plan(pg, db, later + dt.timedelta(days=3), check_max_age_hours=0)["allowed"] is True


def test_refusals_while_a_rollback_may_need_the_backups(pg, ledger):
    db, later = ledger, FINISHED + dt.timedelta(days=8)
    add_check(pg, db, later - dt.timedelta(minutes=5))
    pg.execute("INSERT INTO dedup_rollout.runs (run_id, kind, status, target_run_id) "
               "VALUES ('20251210T000000Z', 'rollback', 'failed', %s)", db, (RUN,))
    out = plan(pg, db, later)
    assert out["allowed"] is False
    assert any("rollback 20251210T000000Z of deploy" in r and "failed" in r for r in out["refusals"])
    forced = plan(pg, db, later, force=True)
    assert forced["allowed"] is True and forced["forced"] == out["refusals"]
    pg.execute("UPDATE dedup_rollout.runs SET status = 'failed' WHERE run_id = %s", db, (RUN,))
    pg.execute("DELETE FROM dedup_rollout.runs WHERE kind = 'rollback'", db)
    assert any("may still have to be rolled back" in r for r in plan(pg, db, later)["refusals"])


def test_drop_only_what_the_ledger_records_and_measure_it(pg, ledger):
    db, later = ledger, FINISHED + dt.timedelta(days=8)
    add_check(pg, db, later - dt.timedelta(minutes=5))
    tables = [f"alpha__{RUN}", f"beta__{RUN}"]
    args = pg_args(pg, db, state="absent", run_id=RUN, now=iso(later))

    refused = run_module("pg_backup_cleanup", dict(args, tables=["unrelated"]))
    assert refused.get("failed") and "not a backup table that the ledger records" in refused["msg"]
    early = run_module("pg_backup_cleanup", dict(args, now=iso(FINISHED), tables=tables))
    assert early.get("failed") and "retention" in early["msg"] and "force" in early["msg"]

    would = run_module("pg_backup_cleanup", dict(args, tables=tables), check=True)
    assert would["changed"] is True and [d["backup_table"] for d in would["dropped"]] == tables
    assert pg.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'dedup_rollout' AND tablename LIKE %s",
                     db, ("%__" + RUN,)) == 2

    sizes = dict(pg.execute("SELECT tablename, pg_total_relation_size(format('%%I.%%I', schemaname, tablename)) "
                            "FROM pg_tables WHERE schemaname = 'dedup_rollout' AND tablename LIKE %s",
                            db, ("%__" + RUN,)))
    size_before = pg.scalar("SELECT pg_database_size(current_database())", db)
    done = run_module("pg_backup_cleanup", dict(args, tables=tables))
    assert done["changed"] is True, done
    assert done["bytes_freed"] == sum(sizes.values()) > 0
    assert done["database_size_before"] == size_before
    assert size_before - done["database_size_after"] == done["bytes_freed"]
    assert pg.scalar("SELECT pg_database_size(current_database())", db) == done["database_size_after"]
    assert pg.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'dedup_rollout' AND tablename LIKE %s",
                     db, ("%__" + RUN,)) == 0
    assert pg.scalar("SELECT to_regclass('dedup_rollout.unrelated') IS NOT NULL", db)
    again = run_module("pg_backup_cleanup", dict(args, tables=tables))
    assert again["changed"] is False and again["dropped"] == []


# --------------------------------------------------------------------------- the playbook on a deployed lab


def ledger_rows(lab, table: str, where: str = "TRUE", params=()) -> list[dict]:
    q = sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE " + where).format(sql.Identifier(LEDGER, table))
    return [json.loads(r[0]) for r in lab.query(q, params)]


def test_cleanup_refuses_before_retention_then_frees_what_it_reports(lab):
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-5000:]
    (deploy,) = ledger_rows(lab, "runs", "kind = 'deploy'")
    run_id = deploy["run_id"]
    finished = dt.datetime.fromisoformat(deploy["finished_at"])
    dump = Path(deploy["dump_path"])
    backups = [r["backup_table"] for r in ledger_rows(lab, "table_runs", "backup_table IS NOT NULL")]
    assert backups and dump.exists()

    def backup_sizes() -> dict[str, int]:
        return dict(lab.query("SELECT tablename::text, pg_total_relation_size(format('%%I.%%I', schemaname, "
                              "tablename)) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
                              (LEDGER, backups)))

    # 1. before the retention: refused, nothing removed, nothing recorded
    res = lab.playbook(CLEANUP)
    assert res.rc != 0
    assert "Refusing to remove the backups of deploy " + run_id in res.output
    assert "the retention of 7 days has not passed" in res.output and "cleanup_force=true" in res.output
    assert set(backup_sizes()) == set(backups) and dump.exists()
    assert ledger_rows(lab, "runs", "kind = 'cleanup'") == []

    # 2. --check with force says what it would free and changes nothing
    res = lab.playbook(CLEANUP, check=True, extra_vars={"cleanup_force": True})
    assert res.rc == 0, res.output[-5000:]
    assert "Would give back" in res.output
    assert set(backup_sizes()) == set(backups) and dump.exists()

    # 3. after the retention, a clean monitoring check at that time, then the cleanup
    later = {"dedup_now": iso(finished + dt.timedelta(days=8))}
    res = lab.playbook(MONITOR, extra_vars=later)
    assert res.rc == 0, res.output[-5000:]
    # Vacuum the backup tables first: otherwise autovacuum may add their free-space and visibility-map
    # forks between this measure and the cleanup's own, and the exact byte counts below would race it.
    admin = lab.admin_conn()
    with admin.cursor() as cur:
        for b in backups:
            cur.execute(sql.SQL("VACUUM {}").format(sql.Identifier(LEDGER, b)))
    admin.close()
    sizes = backup_sizes()
    dump_bytes = dump.stat().st_size
    db_size = lab.query("SELECT pg_database_size(current_database())")[0][0]
    res = lab.playbook(CLEANUP, extra_vars=later)
    assert res.rc == 0, res.output[-5000:]
    assert backup_sizes() == {} and not dump.exists()
    freed = sum(sizes.values()) + dump_bytes
    assert f"({freed} bytes) of deploy {run_id}" in res.output
    # the database really shrank by the backup tables (the ledger rows written since are a few pages)
    shrunk = db_size - lab.query("SELECT pg_database_size(current_database())")[0][0]
    assert sum(sizes.values()) - 64 * 1024 <= shrunk <= sum(sizes.values()) + 64 * 1024

    (cleanup,) = ledger_rows(lab, "runs", "kind = 'cleanup'")
    assert cleanup["status"] == "cleaned" and cleanup["target_run_id"] == run_id
    assert cleanup["dump_path"] == str(dump) and cleanup["dump_bytes"] == dump_bytes
    assert cleanup["details"]["bytes_freed"] == freed and cleanup["details"]["forced"] == []
    assert cleanup["finished_at"].startswith(iso(finished + dt.timedelta(days=8))[:10])
    cleaned = ledger_rows(lab, "table_runs", "run_id = %s", (cleanup["run_id"],))
    assert {r["status"] for r in cleaned} == {"cleaned"}
    assert sorted(r["size_before"] for r in cleaned) == sorted(sizes.values())
    (deploy_after,) = ledger_rows(lab, "runs", "run_id = %s", (run_id,))
    assert deploy_after["status"] == "succeeded" and deploy_after["details"]["cleaned_by"] == cleanup["run_id"]
    report = lab.root / "reports" / lab.inventory.name / run_id / f"cleanup-{cleanup['run_id']}-lab-db.json"
    assert json.loads(report.read_text())["bytes_freed"] == freed

    # 4. a second run finds nothing left: changed=0, no new ledger run
    res = lab.playbook(CLEANUP, extra_vars=later)
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    assert "Nothing left to clean up for deploy " + run_id in res.output
    assert len(ledger_rows(lab, "runs", "kind = 'cleanup'")) == 1

    # 5. a rollback afterwards explains that the backups are gone and changes nothing
    counts = lab.counts()
    res = lab.playbook(REPO / "rollback.yml")
    assert res.rc != 0
    assert f"Cannot roll back deploy {run_id}" in res.output and "Nothing was changed" in res.output
    assert lab.counts() == counts
