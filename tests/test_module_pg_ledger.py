"""pg_ledger on a real database: recording a run creates the ledger first when it is missing (one call)."""

from __future__ import annotations

from modkit import pg_args, render_sql, run_module

VALUES = {"kind": "deploy", "status": "running", "environment": "lab", "mode": "offline", "backup_mode": "table"}


def ledger_present(pg, db) -> bool:
    return pg.execute("SELECT to_regclass('dedup_rollout.runs') IS NOT NULL", db)[0][0]


def test_a_run_creates_the_missing_ledger_in_the_same_call_and_is_idempotent(pg, fresh_db):
    init = render_sql("ledger.sql.j2", dedup_backup_schema="dedup_rollout")
    refused = run_module("pg_ledger", pg_args(pg, fresh_db, action="run", run_id="r1", values=VALUES))
    assert refused.get("failed") and "does not exist yet" in refused["msg"], refused
    check = run_module("pg_ledger", pg_args(pg, fresh_db, action="run", run_id="r1", values=VALUES, init_sql=init),
                       check=True)
    assert check["changed"] and not ledger_present(pg, fresh_db), "check mode creates nothing"
    first = run_module("pg_ledger", pg_args(pg, fresh_db, action="run", run_id="r1", values=VALUES, init_sql=init))
    assert first["changed"] and not first.get("failed"), first
    assert pg.execute("SELECT run_id, kind, status, environment FROM dedup_rollout.runs", fresh_db) == \
        [("r1", "deploy", "running", "lab")]
    again = run_module("pg_ledger", pg_args(pg, fresh_db, action="run", run_id="r1", values=VALUES, init_sql=init))
    assert again["changed"] is False, again
