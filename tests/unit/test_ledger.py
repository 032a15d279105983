"""module_utils/dedup_ledger.py: the one owner of the ledger tables (pure: a recording cursor, no cluster).

The SQL is psycopg2.sql composition; it is rendered here naively (identifiers in double quotes, placeholders as
they are) to see what would run, and the column lists are checked against sql/ledger.sql.j2."""

from __future__ import annotations

import datetime
import decimal
import re

import pytest
from _load import REPO, module_util
from psycopg2 import sql

ledger_mod = module_util("dedup_ledger")
pg = module_util("dedup_pg")


def render(stmt):
    """psycopg2.sql without a connection: identifiers double-quoted, literals repr'd, placeholders kept."""
    if isinstance(stmt, str):
        return stmt
    if isinstance(stmt, sql.Composed):
        return "".join(render(s) for s in stmt.seq)
    if isinstance(stmt, sql.SQL):
        return stmt.string
    if isinstance(stmt, sql.Identifier):
        return ".".join(f'"{s}"' for s in stmt.strings)
    if isinstance(stmt, sql.Placeholder):
        return f"%({stmt.name})s" if stmt.name else "%s"
    if isinstance(stmt, sql.Literal):
        return repr(stmt.wrapped)
    raise TypeError(stmt)


class Cursor:
    """Records (sql text, params); answers fetchone/fetchall from a queue."""

    def __init__(self, *answers):
        self.ran = []
        self.answers = list(answers)

    def execute(self, stmt, params=None):
        self.ran.append((render(stmt), params))

    def fetchone(self):
        return self.answers.pop(0)

    def fetchall(self):
        return self.answers.pop(0)


def schema_columns(table):
    text = (REPO / "sql" / "ledger.sql.j2").read_text()
    body = text.split(f"'{table}'] | pg_qident }}}} (", 1)[1].split("\n);", 1)[0]
    return tuple(m.group(1) for m in re.finditer(r"^\s{4}([a-z0-9_]+)\s", body, re.M) if m.group(1) != "PRIMARY")


def test_column_lists_are_those_of_the_schema_file():
    assert ledger_mod.RUN_COLUMNS == schema_columns("runs")
    assert ledger_mod.TABLE_COLUMNS == schema_columns("table_runs")
    assert ledger_mod.RUN_SETTABLE < set(ledger_mod.RUN_COLUMNS)
    assert ledger_mod.TABLE_SETTABLE < set(ledger_mod.TABLE_COLUMNS)
    assert "run_id" not in ledger_mod.RUN_SETTABLE and "started_at" not in ledger_mod.RUN_SETTABLE


def test_the_migration_writes_only_ledger_columns_and_in_its_own_transaction():
    """sql/ledger_table_run.sql.j2, the ledger step that sql/migrate_table.sql.j2 includes, writes the table's ledger
    row inside the migration's transaction (so the row commits with the rows, and the file stays whole when a DBA
    applies it with psql -f): its column list must be the ledger's, and the migration's last step before COMMIT."""
    step = (REPO / "sql" / "ledger_table_run.sql.j2").read_text().split("-- @step ledger", 1)[1]
    cols = step.split("AS r", 1)[1].split(")", 1)[0]
    written = [c.strip() for c in cols.replace("(", "").split(",")]
    assert written and set(written) <= set(ledger_mod.TABLE_COLUMNS), set(written) - set(ledger_mod.TABLE_COLUMNS)
    updated = re.findall(r"^\s+([a-z_]+) = ", step.split("DO UPDATE", 1)[1], re.M)
    assert updated and set(updated) <= set(ledger_mod.TABLE_COLUMNS)
    migration = (REPO / "sql" / "migrate_table.sql.j2").read_text()
    assert migration.rstrip().endswith("{% include 'ledger_table_run.sql.j2' %}{{ '\\n' }}COMMIT;")
    assert "table_runs" not in migration


def test_schema_name_is_validated():
    with pytest.raises(pg.DedupPgError, match="looks like SQL"):
        ledger_mod.Ledger("x; DROP TABLE y")
    assert ledger_mod.Ledger('we"ird').name("runs") == 'we"ird.runs'


def test_exists_needs_runs_and_table_runs():
    lg = ledger_mod.Ledger("dedup_rollout")
    cur = Cursor([("runs", True), ("table_runs", False), ("monitor_checks", True)])
    assert lg.exists(cur) is False
    text, params = cur.ran[0]
    assert "to_regclass" in text and params == ("dedup_rollout", ["runs", "table_runs", "monitor_checks"])
    assert lg.exists(Cursor([("runs", True), ("table_runs", True), ("monitor_checks", False)])) is True
    assert lg.checks_exist(Cursor([("runs", False), ("table_runs", False), ("monitor_checks", True)])) is True


def test_runs_filters_order_and_the_started_at_text_column():
    lg = ledger_mod.Ledger("dedup_rollout")
    cur = Cursor([("r1", "deploy", "x")])
    rows = lg.runs(cur, ("run_id", "kind", ledger_mod.STARTED_AT_TEXT), kind="deploy", target_run_id="d1", limit=20)
    text, params = cur.ran[0]
    assert text == ('SELECT "run_id", "kind", to_char(started_at, \'YYYY-MM-DD"T"HH24:MI:SSOF\') FROM '
                    '"dedup_rollout"."runs" WHERE "kind" = %s AND "target_run_id" = %s ORDER BY started_at DESC '
                    "LIMIT 20")
    assert params == ["deploy", "d1"]
    assert rows == [{"run_id": "r1", "kind": "deploy", "started_at_text": "x"}]
    with pytest.raises(ledger_mod.LedgerError, match="not a ledger column"):
        lg.runs(Cursor([]), ("run_id", "password"))


def test_latest_deploy_is_the_newest_or_the_named_one():
    lg = ledger_mod.Ledger("dedup_rollout")
    cur = Cursor([])
    assert lg.latest_deploy(cur, ("run_id",), run_id="") is None
    assert '"kind" = %s ORDER BY started_at DESC LIMIT 1' in cur.ran[0][0] and cur.ran[0][1] == ["deploy"]
    cur = Cursor([("d1",)])
    assert lg.latest_deploy(cur, ("run_id",), run_id="d1") == {"run_id": "d1"}
    assert cur.ran[0][1] == ["d1", "deploy"]


def test_table_rows_orders():
    lg = ledger_mod.Ledger("led")
    cur = Cursor([], [], [])
    lg.table_rows(cur, "r1", ("table_name",), with_backup_table=True)
    lg.table_rows(cur, "r1", ("table_name",), order="started")
    lg.table_rows(cur, "r1", ("table_name",), order=None)
    assert cur.ran[0][0].endswith("WHERE run_id = %s AND backup_table IS NOT NULL ORDER BY table_name")
    assert cur.ran[1][0].endswith("ORDER BY started_at NULLS LAST, table_name")
    assert cur.ran[2][0].endswith("WHERE run_id = %s") and cur.ran[2][1] == ("r1",)


def test_assignments_and_unknown_columns():
    sets, params = ledger_mod.assignments({"status": "succeeded", "finished_at": "now", "details": {"a": 1}},
                                          ledger_mod.RUN_SETTABLE)
    assert [render(s) for s in sets] == ["details = details || %s::jsonb", "finished_at = clock_timestamp()",
                                         '"status" = %s']
    assert params == ['{"a": 1}', "succeeded"]
    sets, params = ledger_mod.assignments({"finished_at": "2026-11-30T10:00:00Z"}, ledger_mod.RUN_SETTABLE)
    assert [render(s) for s in sets] == ['"finished_at" = %s'] and params == ["2026-11-30T10:00:00Z"]
    with pytest.raises(ledger_mod.LedgerError, match=r"unknown column 'run_id' \(allowed: backup_mode, "):
        ledger_mod.assignments({"run_id": "x"}, ledger_mod.RUN_SETTABLE)


def test_put_run_new_needs_kind_and_status_and_inserts_then_updates():
    lg = ledger_mod.Ledger("led")
    with pytest.raises(ledger_mod.LedgerError, match="needs values.kind and values.status"):
        lg.put_run(Cursor(None), "r1", {"status": "running"})
    cur = Cursor(None, ('{"run_id": "r1", "kind": "deploy", "status": "running"}',))
    before, after = lg.put_run(cur, "r1", {"kind": "deploy", "status": "running", "environment": "lab"})
    assert before is None and after["kind"] == "deploy"
    assert [t.split(" (")[0].split(" SET")[0] for t, _ in cur.ran] == [
        'SELECT row_to_json(r)::text FROM "led"."runs" r WHERE run_id = %s', 'INSERT INTO "led"."runs"',
        'UPDATE "led"."runs"', 'SELECT row_to_json(r)::text FROM "led"."runs" r WHERE run_id = %s']
    assert cur.ran[2][1] == ["lab", "deploy", "running", "r1"]


def test_put_table_creates_only_with_natural_key_and_status():
    lg = ledger_mod.Ledger("led")
    with pytest.raises(ledger_mod.LedgerError, match=r"no ledger row for table s.t in run r1 \(give"):
        lg.put_table(Cursor(None), "r1", "s", "t", {"status": "constrained"})
    cur = Cursor(None, ('{"status": "constrained"}',))
    lg.put_table(cur, "r1", "s", "t", {"natural_key": ["a"], "status": "constrained", "size_after": 5})
    insert, params = cur.ran[1]
    assert insert.startswith('INSERT INTO "led"."table_runs" ("run_id", "schema_name", "table_name", "natural_key", '
                             '"keep", "order_by", "status", "started_at") VALUES (%(run_id)s, ')
    assert params["keep"] == "oldest" and params["order_by"] == "" and params["natural_key"] == ["a"]
    update, params = cur.ran[2]
    assert update.startswith('UPDATE "led"."table_runs" SET "natural_key" = %s, "size_after" = %s, "status" = %s')
    assert params[-3:] == ["r1", "s", "t"]


def test_start_table_for_the_online_path():
    lg = ledger_mod.Ledger("led")
    cur = Cursor()
    lg.start_table(cur, "r1", "s", "t", ("k1", "k2"), "oldest", "id", "deduplicated", size_of='"s"."t"',
                   if_absent=True, strategy="online", backup_mode="table", backup_table="t__r1", rows_removed=0)
    text, params = cur.ran[0]
    assert '"strategy", "size_before", "started_at") VALUES (' in text
    assert "pg_catalog.pg_total_relation_size(%(size_of)s::regclass), clock_timestamp())" in text
    assert text.endswith("ON CONFLICT (run_id, schema_name, table_name) DO NOTHING")
    assert params["natural_key"] == ["k1", "k2"] and params["size_of"] == '"s"."t"' and params["rows_removed"] == 0
    with pytest.raises(ledger_mod.LedgerError):
        lg.start_table(Cursor(), "r1", "s", "t", ["k"], "oldest", "id", "deduplicated", schema_name="x")


def test_writes_go_through_the_callers_execute():
    seen = []
    lg = ledger_mod.Ledger("led", execute=lambda cur, stmt, params: seen.append((render(stmt), params)))
    lg.add_removed(None, "r1", "s", "t", 7)
    lg.mark_rolled_back(None, "r1", "s", "t")
    assert seen[0] == ('UPDATE "led"."table_runs" SET rows_removed = coalesce(rows_removed, 0) + %(n)s WHERE '
                       "run_id = %(run)s AND schema_name = %(schema)s AND table_name = %(table)s",
                       {"n": 7, "run": "r1", "schema": "s", "table": "t"})
    assert seen[1][0].startswith('UPDATE "led"."table_runs" SET status = \'rolled_back\' WHERE run_id = %(run)s')


def test_last_check_as_a_dict():
    lg = ledger_mod.Ledger("led")
    when = datetime.datetime(2026, 11, 30, tzinfo=datetime.timezone.utc)
    assert lg.last_check(Cursor(None), "d1") is None
    got = lg.last_check(Cursor((3, when, "scheduled", False, None, "h")), "d1")
    assert got == {"check_id": 3, "checked_at": when, "source": "scheduled", "clean": False, "problems": [],
                   "host": "h"}


def test_changed_ignores_finished_at_and_jsonable():
    assert ledger_mod.changed(None, {"a": 1})
    assert not ledger_mod.changed({"a": 1, "finished_at": "x"}, {"a": 1, "finished_at": "y"})
    assert ledger_mod.changed({"a": 1}, {"a": 2})
    assert ledger_mod.jsonable(decimal.Decimal("1.5")) == 1.5
    assert ledger_mod.jsonable(datetime.date(2026, 11, 30)) == "2026-11-30"
    assert ledger_mod.jsonable("x") == "x" and ledger_mod.jsonable(None) is None
