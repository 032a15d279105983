"""Issue 14, parts 3 and 4: what else sees the tables (logical replication, publications, subscriptions), what
would divert the migration (rules, user triggers), and the ledger belongs to the tool.

Real parts: a throwaway cluster with wal_level=logical (slots and test_decoding), the modules' own code run
in-process (modkit), the migration template rendered with the repo's own filters, and one real
ansible-playbook deploy on the lab (whose cluster is switched to wal_level=logical for that test).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import jinja2
import psycopg2
import pytest
from psycopg2 import sql

from harness import REPO, destroy_cluster, start_cluster, wait_for
from modkit import pg_args, run_module

DEPLOY = REPO / "deploy_dedup.yml"

ITEMS_SQL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.items (id bigserial PRIMARY KEY, k int NOT NULL, v text,
                        created_at timestamptz NOT NULL DEFAULT clock_timestamp());
-- 50 keys, 3 copies each, interleaved
INSERT INTO {s}.items (k, v) SELECT k, 'copy ' || c FROM generate_series(1, 3) c, generate_series(1, 50) k
ORDER BY c, k;
"""


@pytest.fixture(scope="module")
def lpg():
    """A cluster of our own with logical decoding on (the session's harness cluster has wal_level=replica)."""
    cluster = start_cluster(extra_conf={"wal_level": "logical", "max_replication_slots": "10"})
    try:
        yield cluster
    finally:
        destroy_cluster(cluster)


@pytest.fixture
def ldb(lpg):
    name = "n_" + uuid.uuid4().hex[:12]
    lpg.create_database(name)
    try:
        yield name
    finally:
        for (slot,) in lpg.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", params=(name,)):
            lpg.execute("SELECT pg_drop_replication_slot(%s)", params=(slot,))
        lpg.drop_database(name)


def _sql(pg, db, text, params=None):
    return pg.execute(text, dbname=db, params=params)


def _items(pg, db, schema="s"):
    _sql(pg, db, ITEMS_SQL.format(s=schema))


def plan(pg, db, schema="s", table="items", **kw):
    args = pg_args(pg, db, schema=schema, tables=[{"name": table, "natural_key": ["k"], "order_by": "created_at"}],
                   run_id="r1", check_neighbours=True)
    args.update(kw)
    return run_module("pg_dedup_plan", args)


def warnings(res) -> str:
    """The module's warnings as one text (ansible-core 2.19 wraps each in a WarningSummary dict)."""
    return json.dumps(res.get("warnings", []))


def refused(res, *needles):
    assert res.get("failed"), res
    for n in needles:
        assert n in res["msg"], (n, res["msg"])
    assert res["msg"].startswith("Nothing was changed")


# --------------------------------------------------------------------------- publications, slots, subscriptions


def test_publication_without_truncate_refuses_replace_naming_it_and_the_option(lpg, ldb):
    _items(lpg, ldb)
    assert not plan(lpg, ldb).get("failed")
    _sql(lpg, ldb, "CREATE PUBLICATION app_pub FOR TABLE s.items WITH (publish = 'insert, update, delete')")
    refused(plan(lpg, ldb), "s.items", '"app_pub"', "not TRUNCATE", "preflight_strategy=delete",
            "preflight_allow_truncate_replication=true")
    # delete: replicated row by row, the PK is the replica identity; or the DBA's explicit escape hatch
    ok = plan(lpg, ldb, strategy="delete")
    assert not ok.get("failed"), ok
    assert ok["tables"][0]["neighbours"]["publications"] == [
        {"name": "app_pub", "all_tables": False, "insert": True, "update": True, "delete": True, "truncate": False}]
    assert not plan(lpg, ldb, allow_truncate_replication=True).get("failed")
    # validate's call (no check_neighbours) only reports
    assert not plan(lpg, ldb, check_neighbours=False).get("failed")
    # a publication that does publish TRUNCATE is not refused by itself; FOR ALL TABLES without it is
    _sql(lpg, ldb, "DROP PUBLICATION app_pub; CREATE PUBLICATION full_pub FOR TABLE s.items")
    assert not plan(lpg, ldb).get("failed")
    _sql(lpg, ldb, "CREATE PUBLICATION everything FOR ALL TABLES WITH (publish = 'insert, update, delete')")
    refused(plan(lpg, ldb), '"everything" (FOR ALL TABLES)', "preflight_strategy=delete")
    assert _sql(lpg, ldb, "SELECT count(*) FROM s.items")[0][0] == 150


def test_logical_slot_refuses_replace(lpg, ldb):
    _items(lpg, ldb)
    slot = "cdc_" + ldb
    _sql(lpg, ldb, "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    res = plan(lpg, ldb)
    refused(res, f'"{slot}" (plugin test_decoding, inactive)', "skip TRUNCATE", "preflight_strategy=delete",
            "preflight_allow_truncate_replication=true")
    ok = plan(lpg, ldb, strategy="delete")
    assert not ok.get("failed"), ok
    assert [s["name"] for s in ok["slots"]] == [slot]
    assert not plan(lpg, ldb, mode="online").get("failed")  # online mode deletes in batches, never TRUNCATEs


def test_subscription_target_refuses_replace(lpg, ldb):
    """A managed table another database's publication writes into (the subscription created disabled)."""
    _items(lpg, ldb)
    upstream = "u_" + uuid.uuid4().hex[:12]
    lpg.create_database(upstream)
    sub = "sub_" + ldb
    try:
        _items(lpg, upstream)
        _sql(lpg, upstream, "CREATE PUBLICATION up_pub FOR TABLE s.items")
        conninfo = f"host=127.0.0.1 port={lpg.port} dbname={upstream} user={lpg.superuser} password={lpg.password}"
        _sql(lpg, ldb, sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION up_pub WITH (create_slot = false, "
                               "enabled = false, copy_data = false, slot_name = 'unused')").format(
            sql.Identifier(sub), sql.Literal(conninfo)))
        refused(plan(lpg, ldb), f'written by subscription "{sub}"', "Deduplicate on the publisher",
                "preflight_strategy=delete")
        ok = plan(lpg, ldb, strategy="delete")
        assert not ok.get("failed"), ok
        assert f'written by subscription \\"{sub}\\": the publisher still has the removed rows' in warnings(ok)
        # a role that may not read the subscription catalogs still gets a plan (best effort, said so)
        role = "weak_" + uuid.uuid4().hex[:8]
        _sql(lpg, ldb, sql.SQL("CREATE ROLE {r} LOGIN PASSWORD 'pw'; ALTER TABLE s.items OWNER TO {r}; "
                               "GRANT USAGE ON SCHEMA s TO {r}").format(r=sql.Identifier(role)))
        weak = run_module("pg_dedup_plan", {**pg_args(lpg, ldb, login_user=role, login_password="pw"),
                                            "schema": "s", "tables": [{"name": "items", "natural_key": ["k"]}],
                                            "run_id": "r1", "strategy": "delete", "check_neighbours": True})
        assert not weak.get("failed"), weak
    finally:
        _sql(lpg, ldb, sql.SQL("ALTER SUBSCRIPTION {s} SET (slot_name = NONE); DROP SUBSCRIPTION {s}").format(
            s=sql.Identifier(sub)))
        lpg.drop_database(upstream)


def test_published_deletes_need_a_replica_identity(lpg, ldb):
    _sql(lpg, ldb, "CREATE SCHEMA s; CREATE TABLE s.nopk (k int NOT NULL, v text, "
                   "created_at timestamptz NOT NULL DEFAULT clock_timestamp()); "
                   "INSERT INTO s.nopk (k, v) SELECT k % 10, 'v' FROM generate_series(1, 30) k; "
                   "CREATE PUBLICATION app_pub FOR TABLE s.nopk WITH (publish = 'insert, update, delete')")
    res = plan(lpg, ldb, table="nopk", strategy="delete")
    refused(res, "s.nopk", '"app_pub"', "REPLICA IDENTITY DEFAULT, no primary key",
            "ALTER TABLE s.nopk REPLICA IDENTITY FULL")
    # what preflight saves us from: PostgreSQL itself fails the DELETE
    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="replica identity"):
        _sql(lpg, ldb, "DELETE FROM s.nopk WHERE k = 1")
    _sql(lpg, ldb, "ALTER TABLE s.nopk REPLICA IDENTITY FULL")
    assert not plan(lpg, ldb, table="nopk", strategy="delete").get("failed")


# --------------------------------------------------------------------------- rules


def test_instead_rule_refused_in_both_strategies(lpg, ldb):
    _items(lpg, ldb)
    _sql(lpg, ldb, "CREATE RULE items_keep_forever AS ON DELETE TO s.items DO INSTEAD NOTHING")
    for strategy in ("replace", "delete"):
        refused(plan(lpg, ldb, strategy=strategy), '"items_keep_forever" (ON DELETE DO INSTEAD',
                "ALTER TABLE s.items DISABLE RULE")
    # a disabled rule does not fire: allowed
    _sql(lpg, ldb, "ALTER TABLE s.items DISABLE RULE items_keep_forever")
    assert not plan(lpg, ldb).get("failed")
    _sql(lpg, ldb, "CREATE RULE items_no_insert AS ON INSERT TO s.items DO INSTEAD NOTHING")
    refused(plan(lpg, ldb), '"items_no_insert" (ON INSERT DO INSTEAD')


# --------------------------------------------------------------------------- the ledger belongs to the tool


def test_ledger_schema_of_another_role_refused(lpg, ldb):
    _items(lpg, ldb)
    other = "stranger_" + uuid.uuid4().hex[:8]
    _sql(lpg, ldb, sql.SQL("CREATE ROLE {o}; CREATE SCHEMA dedup_rollout AUTHORIZATION {o}").format(
        o=sql.Identifier(other)))
    try:
        refused(plan(lpg, ldb), "dedup_backup_schema=dedup_rollout", f'schema "dedup_rollout" is owned by role '
                f'"{other}"', f"not by {lpg.superuser} (the connecting role", "not adopted")
        # the schema is ours, a ledger table in it is not
        _sql(lpg, ldb, sql.SQL("ALTER SCHEMA dedup_rollout OWNER TO {me}; CREATE TABLE dedup_rollout.runs "
                               "(run_id text PRIMARY KEY); ALTER TABLE dedup_rollout.runs OWNER TO {o}").format(
            me=sql.Identifier(lpg.superuser), o=sql.Identifier(other)))
        refused(plan(lpg, ldb), f'table "dedup_rollout"."runs" is owned by role "{other}"')
        _sql(lpg, ldb, sql.SQL("ALTER TABLE dedup_rollout.runs OWNER TO {me}").format(
            me=sql.Identifier(lpg.superuser)))
        assert not plan(lpg, ldb).get("failed")
    finally:
        _sql(lpg, ldb, sql.SQL("DROP SCHEMA IF EXISTS dedup_rollout CASCADE; DROP ROLE {o}").format(
            o=sql.Identifier(other)))


# --------------------------------------------------------------------------- the migration itself


def render_migration(t: dict, run_id: str = "r1", lock_timeout: str = "5s") -> str:
    """sql/migrate_table.sql.j2 rendered as roles/migrate renders it (the repo's filters, trim_blocks)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dedup_filters", REPO / "plugins" / "filter" / "dedup.py")
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO / "sql")), trim_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(filters.FilterModule().filters())
    return env.get_template("migrate_table.sql.j2").render(
        t=t, run_id=run_id, backup_mode="table", backup_schema="dedup_rollout", lock_timeout=lock_timeout,
        work_mem="64MB", maintenance_work_mem="64MB")


def ledger(pg, db):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO / "sql")), trim_blocks=True)
    import importlib.util

    spec = importlib.util.spec_from_file_location("dedup_filters", REPO / "plugins" / "filter" / "dedup.py")
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    env.filters.update(filters.FilterModule().filters())
    _sql(pg, db, env.get_template("ledger.sql.j2").render(dedup_backup_schema="dedup_rollout"))
    _sql(pg, db, "INSERT INTO dedup_rollout.runs (run_id, kind, status) VALUES ('r1', 'deploy', 'running')")


AUDIT_SQL = """
CREATE TABLE {s}.audit (op text, id bigint, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION {s}.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.audit (op, id)
    VALUES (TG_OP || '/' || TG_NAME, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER audit_after AFTER INSERT OR DELETE ON {s}.items FOR EACH ROW EXECUTE FUNCTION {s}.audit_row();
CREATE TRIGGER audit_always BEFORE INSERT OR DELETE ON {s}.items FOR EACH ROW EXECUTE FUNCTION {s}.audit_row();
ALTER TABLE {s}.items ENABLE ALWAYS TRIGGER audit_always;
"""


@pytest.mark.parametrize("strategy", ["replace", "delete"])
def test_audit_trigger_fires_for_no_row_in_either_strategy(lpg, ldb, strategy):
    schema = "s_" + strategy
    _items(lpg, ldb, schema)
    _sql(lpg, ldb, AUDIT_SQL.format(s=schema))
    ledger(lpg, ldb)
    p = plan(lpg, ldb, schema=schema, strategy=strategy)
    assert not p.get("failed"), p
    t = p["tables"][0]
    assert {x["name"]: x["enabled"] for x in t["triggers"]} == {"audit_after": "O", "audit_always": "A"}
    res = run_module("pg_migrate_table", pg_args(lpg, ldb, schema=schema, table="items", strategy=strategy,
                                                 sql=render_migration(t), run_id="r1", retry_delay=0.2))
    assert res.get("changed") and not res.get("failed"), res
    assert res["ledger"]["rows_removed"] == 100
    assert _sql(lpg, ldb, f"SELECT count(*), count(DISTINCT k) FROM {schema}.items")[0] == (50, 50)
    assert _sql(lpg, ldb, f"SELECT count(*) FROM {schema}.audit")[0][0] == 0
    # restored exactly, and live again
    assert dict(_sql(lpg, ldb, "SELECT tgname::text, tgenabled::text FROM pg_trigger WHERE tgrelid = %s::regclass "
                               "AND NOT tgisinternal", (f"{schema}.items",))) == {"audit_after": "O",
                                                                                   "audit_always": "A"}
    _sql(lpg, ldb, f"DELETE FROM {schema}.items WHERE k = 1")
    assert _sql(lpg, ldb, f"SELECT count(*) FROM {schema}.audit")[0][0] == 2


def test_vacuum_full_behind_a_lock_warns_and_keeps_the_committed_migration(lpg, ldb):
    """A reader queued behind the migration gets the table right after the commit and stays in its transaction:
    the delete strategy's VACUUM FULL waits at most the migration's lock_timeout, then warns (the rows are done)."""
    _items(lpg, ldb)
    ledger(lpg, ldb)
    p = plan(lpg, ldb, strategy="delete")
    assert not p.get("failed"), p
    text = render_migration(p["tables"][0], lock_timeout="2s")
    first = lpg.connect(ldb, autocommit=False)
    second = lpg.connect(ldb, autocommit=False)
    held = threading.Event()

    def queue_behind():
        with second.cursor() as cur:
            cur.execute("SET lock_timeout = 0; LOCK TABLE s.items IN ACCESS SHARE MODE")
        held.set()
        time.sleep(8)
        with contextlib.suppress(psycopg2.InterfaceError):  # the test may have closed it already
            second.rollback()

    def waiting(n):
        return _sql(lpg, ldb, "SELECT count(*) FROM pg_locks WHERE relation = 's.items'::regclass AND NOT granted"
                    )[0][0] >= n

    def choreography():
        wait_for(lambda: waiting(1), timeout=10, interval=0.05)  # the migration waits behind `first`
        threading.Thread(target=queue_behind, daemon=True).start()
        wait_for(lambda: waiting(2), timeout=10, interval=0.05)  # `second` queued behind the migration
        first.rollback()

    with first.cursor() as cur:
        cur.execute("LOCK TABLE s.items IN ACCESS SHARE MODE")
    th = threading.Thread(target=choreography, daemon=True)
    th.start()
    t0 = time.monotonic()
    res = run_module("pg_migrate_table", pg_args(lpg, ldb, schema="s", table="items", strategy="delete", sql=text,
                                                 run_id="r1", retry_delay=0.2))
    seconds = time.monotonic() - t0
    th.join(timeout=10)
    assert held.is_set()
    try:
        assert res.get("changed") and not res.get("failed"), res
        assert [s["step"] for s in res["steps"]][-1] == "vacuum_full_skipped", res["steps"]
        warning = warnings(res)
        assert "could not get its lock within lock_timeout=2s" in warning, res
        assert 'VACUUM (FULL, ANALYZE) \\"s\\".\\"items\\"' in warning
        assert seconds < 7, seconds  # not until `second` let go (8 s)
        assert _sql(lpg, ldb, "SELECT count(*) FROM s.items")[0][0] == 50
        assert _sql(lpg, ldb, "SELECT status, rows_removed FROM dedup_rollout.table_runs")[0] == ("deduplicated", 100)
    finally:
        second.close()
        first.close()


def test_many_tables_in_one_call_go_on_past_a_failed_table_and_name_it(lpg, ldb):
    """The role's form: one pg_migrate_table call for every table. A table whose lock cannot be had is rolled back
    and the others go on (as a loop of one call per table did): the call fails naming it and the tables done, which
    stay committed and recorded (rows and size_after)."""
    for schema in ("s_a", "s_b", "s_c"):
        _items(lpg, ldb, schema)
    ledger(lpg, ldb)
    jobs = []
    for schema in ("s_a", "s_b", "s_c"):
        p = plan(lpg, ldb, schema=schema)
        assert not p.get("failed"), p
        t = dict(p["tables"][0], backup_table=f"items_{schema}__r1")  # three plans, one backup schema
        jobs.append({"schema": schema, "table": "items", "strategy": "replace",
                     "sql": render_migration(t, lock_timeout="300ms")})
    holder = lpg.connect(ldb, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE s_b.items IN ACCESS SHARE MODE")
        res = run_module("pg_migrate_table", pg_args(lpg, ldb, tables=jobs, run_id="r1", retries=1, retry_delay=0.1,
                                                     ledger_schema="dedup_rollout"))
    finally:
        holder.rollback()
        holder.close()
    assert res.get("failed") and res["failed_table"] == "items" and res["failed_tables"] == ["items"], res
    assert "s_b.items" in res["msg"] and "(deduplicated and committed in this step: items, items)" in res["msg"], \
        res["msg"]
    assert [(r["schema"], r["changed"], r.get("failed", False)) for r in res["results"]] == \
        [("s_a", True, False), ("s_b", False, True), ("s_c", True, False)]
    assert res["results"][0]["ledger"]["rows_removed"] == 100 and res["results"][0]["size_after"] > 0
    counts = {s: _sql(lpg, ldb, f"SELECT count(*) FROM {s}.items")[0][0] for s in ("s_a", "s_b", "s_c")}
    assert counts == {"s_a": 50, "s_b": 150, "s_c": 50}, counts
    assert _sql(lpg, ldb, "SELECT schema_name, status, size_after > 0 FROM dedup_rollout.table_runs "
                          "ORDER BY 1") == [("s_a", "deduplicated", True), ("s_c", "deduplicated", True)]
    # the same call again (the re-run): a and c have no duplicates left, b is done now
    again = run_module("pg_migrate_table", pg_args(lpg, ldb, tables=jobs, run_id="r1", retry_delay=0.1,
                                                   ledger_schema="dedup_rollout"))
    assert not again.get("failed") and again["changed"], again
    assert [(r["schema"], r["changed"]) for r in again["results"]] == [("s_a", False), ("s_b", True), ("s_c", False)]
    assert {s: _sql(lpg, ldb, f"SELECT count(*) FROM {s}.items")[0][0] for s in ("s_a", "s_b", "s_c")} == \
        {"s_a": 50, "s_b": 50, "s_c": 50}
    check = run_module("pg_migrate_table", pg_args(lpg, ldb, tables=jobs, run_id="r1"), check=True)
    assert check["changed"] and len(check["results"]) == 3 and "would deduplicate 3 table(s)" in check["msg"]


def test_many_tables_in_one_call_stop_between_tables_once_the_play_is_gone(lpg, ldb):
    """One pg_migrate_table call for two tables, the play's run lock held by a session named as pg_run_lock's
    holder names it. The play dies (its holder session goes) while the first table waits for its lock: that table,
    already under way in its transaction, finishes and commits; the second is never started, and the call says so."""
    from ansible.module_utils.dedup_pg import run_lock_app_name

    for schema in ("s_a", "s_b"):
        _items(lpg, ldb, schema)
    ledger(lpg, ldb)
    jobs = []
    for schema in ("s_a", "s_b"):
        p = plan(lpg, ldb, schema=schema)
        assert not p.get("failed"), p
        t = dict(p["tables"][0], backup_table=f"items_{schema}__r1")
        jobs.append({"schema": schema, "table": "items", "strategy": "replace",
                     "sql": render_migration(t, lock_timeout="20s")})
    play = psycopg2.connect(**lpg.dsn(ldb), application_name=run_lock_app_name("rk"))
    blocker = lpg.connect(ldb, autocommit=False)
    results = []
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE s_a.items IN ACCESS SHARE MODE")
        worker = threading.Thread(target=lambda: results.append(run_module("pg_migrate_table", pg_args(
            lpg, ldb, tables=jobs, run_id="r1", run_lock_id="rk", retry_delay=0.1, ledger_schema="dedup_rollout"))))
        worker.start()
        wait_for(lambda: _sql(lpg, ldb, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND query LIKE '%%LOCK TABLE%%s_a%%'")[0][0] == 1, timeout=30)
        play.close()  # the play is gone
        blocker.rollback()  # the first table gets its lock and goes on in the transaction it is in
        worker.join(timeout=60)
    finally:
        blocker.close()
        if not play.closed:
            play.close()
    assert results, "pg_migrate_table did not return"
    res = results[0]
    assert res.get("failed"), res
    assert "the play that started the migration is gone; stopped before s_b.items" in res["msg"], res
    counts = {s: _sql(lpg, ldb, f"SELECT count(*) FROM {s}.items")[0][0] for s in ("s_a", "s_b")}
    assert counts == {"s_a": 50, "s_b": 150}, counts
    assert _sql(lpg, ldb, "SELECT schema_name FROM dedup_rollout.table_runs") == [("s_a",)]


def test_online_backup_table_is_owner_only_under_default_privileges(lpg, ldb):
    _items(lpg, ldb)
    ledger(lpg, ldb)
    reader = "reader_" + uuid.uuid4().hex[:8]
    _sql(lpg, ldb, sql.SQL("CREATE ROLE {r}; GRANT USAGE ON SCHEMA dedup_rollout TO {r}; "
                           "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {r}").format(r=sql.Identifier(reader)))
    try:
        res = run_module("pg_online_dedup", pg_args(lpg, ldb, schema="s", table="items", natural_key=["k"],
                                                    run_id="r1", backup_table="items__r1", batch_rows=20,
                                                    batch_pause=0, retry_delay=0.2, repack="never"))
        assert not res.get("failed"), res
        assert _sql(lpg, ldb, "SELECT count(*) FROM dedup_rollout.items__r1")[0][0] == 100
        assert _sql(lpg, ldb, "SELECT has_table_privilege(%s, 'dedup_rollout.items__r1', 'SELECT')",
                    (reader,))[0][0] is False
        grantees = _sql(lpg, ldb, "SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a "
                                  "WHERE c.oid = 'dedup_rollout.items__r1'::regclass")
        assert grantees == [(lpg.superuser,)]
    finally:
        _sql(lpg, ldb, sql.SQL("ALTER DEFAULT PRIVILEGES REVOKE SELECT ON TABLES FROM {r}; "
                               "DROP OWNED BY {r}; DROP ROLE {r}").format(r=sql.Identifier(reader)))


# --------------------------------------------------------------------------- the real deploy


def test_deploy_refuses_replace_under_replication_then_delete_replicates_deletes(lab):
    """The lab with a publication (no TRUNCATE) and a test_decoding slot: the default deploy refuses before
    anything changes; with preflight_strategy=delete it passes and the slot's consumer sees DELETEs only."""
    pg = lab.pg
    slot = "cdc_" + lab.dbname
    pg.execute("ALTER SYSTEM SET wal_level = 'logical'")
    pg.restart()
    try:
        admin = lab.admin_conn()
        with admin.cursor() as cur:
            cur.execute("CREATE PUBLICATION app_pub FOR TABLE breezeway.task_comments, breezeway.task_photos "
                        "WITH (publish = 'insert, update, delete')")
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
        admin.close()
        cron, counts = lab.crontab(), lab.counts()
        res = lab.playbook(DEPLOY)
        assert res.rc != 0, res.output[-3000:]
        for needle in ('"app_pub"', "breezeway.task_comments", f'"{slot}" (plugin test_decoding',
                       "preflight_strategy=delete", "preflight_allow_truncate_replication=true"):
            assert needle in res.output, needle
        assert lab.crontab() == cron and lab.counts() == counts
        assert lab.query("SELECT to_regnamespace('dedup_rollout') IS NULL")[0][0]

        res = lab.playbook(DEPLOY, extra_vars={"preflight_strategy": "delete"})
        assert res.rc == 0, res.output[-5000:]
        assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
        removed = dict(lab.query("SELECT table_name, rows_removed FROM dedup_rollout.table_runs "
                                 "WHERE rows_removed > 0"))
        assert removed and sum(removed.values()) > 0
        admin = lab.admin_conn()
        with admin.cursor() as cur:  # a slot's changes need a superuser or a replication role
            cur.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,))
            changes = [r[0] for r in cur.fetchall()]
        admin.close()
        assert not [c for c in changes if "TRUNCATE" in c], [c for c in changes if "TRUNCATE" in c][:3]
        for table, n in removed.items():
            deletes = [c for c in changes if c.startswith(f"table breezeway.{table}: DELETE:")]
            assert len(deletes) == n, (table, len(deletes), n)
        print(f"{len(changes)} decoded changes, DELETEs per table: {removed}")
    finally:
        admin = lab.admin_conn()
        with admin.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,))
            cur.execute("DROP PUBLICATION IF EXISTS app_pub")
        admin.close()
        pg.execute("ALTER SYSTEM RESET wal_level")
        pg.restart()
