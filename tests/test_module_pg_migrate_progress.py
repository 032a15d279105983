"""pg_migrate_progress against real sessions: it finds the migration by its step marker and says what it waits for."""

from __future__ import annotations

import threading
import time

import psycopg2
from psycopg2 import sql

from modkit import pg_args, run_module

from ansible.module_utils.dedup_plan import parse_marker, step_marker  # isort: skip  (made visible by modkit)

HOSTILE = 'we*/ird "T" */ DROP TABLE x; --'


def test_marker_round_trip_with_hostile_names():
    mark = step_marker("20261126T000000Z", "Weird Schema", HOSTILE, "keep", 4, 10, 2)
    assert mark.startswith("/* dedup-rollout {") and mark.endswith(" */\n")
    assert mark.count("*/") == 1, "a name cannot end the comment early"
    assert parse_marker(mark + "SELECT 1") == {"run": "20261126T000000Z", "schema": "Weird Schema",
                                               "table": HOSTILE, "step": "keep", "n": 4, "of": 10, "attempt": 2}
    assert parse_marker("SELECT 1") is None
    assert parse_marker("/* dedup-rollout not json */ SELECT 1") is None


def _conn(pg, db):
    return psycopg2.connect(host="127.0.0.1", port=pg.port, dbname=db, user=pg.superuser, password=pg.password)


def test_reports_the_step_and_the_lock_it_waits_for(pg, fresh_db):
    table = sql.Identifier("public", HOSTILE)
    holder = _conn(pg, fresh_db)
    with holder.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id int)").format(table))
        holder.commit()
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(table))
        cur.execute("SELECT pg_backend_pid()")
        holder_pid = cur.fetchone()[0]
    migration = _conn(pg, fresh_db)
    errors = []

    def migrate():
        try:
            with migration.cursor() as cur:
                cur.execute(sql.SQL(step_marker("run1", "public", HOSTILE, "lock", 2, 10, 1))
                            + sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
            migration.rollback()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=migrate)
    th.start()
    try:
        time.sleep(1.0)
        res = run_module("pg_migrate_progress", pg_args(pg, fresh_db, run_id="run1", schema="public",
                                                        table=HOSTILE, wait=0))
        assert res["running"] is True, res
        assert res["step"] == "lock" and res["step_number"] == [2, 10] and res["attempt"] == 1
        assert res["waiting_for"]["event"] == "Lock/relation"
        assert holder_pid in res["waiting_for"]["blocking_pids"]
        assert f"held by pid(s) {holder_pid}" in res["msg"] and "step 2/10 'lock'" in res["msg"]
        assert res["changed"] is False

        other = run_module("pg_migrate_progress", pg_args(pg, fresh_db, run_id="another run", schema="public",
                                                          table=HOSTILE, wait=0))
        assert other["running"] is False, "only the named run's session counts"

        # the list form (one pg_migrate_table call for every table): the reader follows whichever table it is on
        many = run_module("pg_migrate_progress", pg_args(pg, fresh_db, run_id="run1",
                                                         tables=[["public", "other"], ["public", HOSTILE]], wait=0))
        assert many["running"] is True and many["step"] == "lock", many
        assert many["msg"].startswith(f"(table 2 of 2) public.{HOSTILE}: step 2/10 'lock'"), many["msg"]
        none = run_module("pg_migrate_progress", pg_args(pg, fresh_db, run_id="run1", tables=[["public", "other"]],
                                                         wait=0))
        assert none["running"] is False, "a table the list does not name is not reported"
    finally:
        holder.rollback()
        th.join(timeout=30)
        holder.close()
        migration.close()
    assert not errors, errors

    t0 = time.monotonic()
    gone = run_module("pg_migrate_progress", pg_args(pg, fresh_db, run_id="run1", schema="public",
                                                     table=HOSTILE, wait=30))
    assert gone["running"] is False and time.monotonic() - t0 < 10, "returns at once when the session is gone"
