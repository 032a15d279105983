"""pg_unique_constraint against the harness's real PostgreSQL: idempotence by meaning, refusals, recovery."""

from __future__ import annotations

import re
import threading
import time

import psycopg2
import pytest

from harness import free_port, run_playbook
from modkit import ansible_doc, pg_args, render_sql, run_adhoc, run_module

SETUP = """
CREATE TABLE public.t (id serial PRIMARY KEY, a int NOT NULL, b int NOT NULL, note text);
INSERT INTO public.t (a, b) SELECT g, g % 7 FROM generate_series(1, 200) g;
CREATE TABLE public.task_tags (id serial PRIMARY KEY, task_pk int NOT NULL, tag_pk int NOT NULL);
ALTER TABLE public.task_tags ADD CONSTRAINT task_tags_unique UNIQUE (task_pk, tag_pk);
CREATE TABLE public.dups (id serial PRIMARY KEY, a int NOT NULL, b int NOT NULL);
INSERT INTO public.dups (a, b) VALUES (1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (3, 3);
CREATE TABLE public.n (id serial PRIMARY KEY, a int, b int);
INSERT INTO public.n (a, b) VALUES (1, NULL), (2, NULL), (NULL, NULL);
CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."Order" ("User" int NOT NULL, "key col" text NOT NULL, "select" text);
INSERT INTO "My Schema"."Order" VALUES (1, 'a', 'x'), (2, 'a', 'x');
"""


@pytest.fixture
def db(pg, fresh_db):
    pg.execute(SETUP, fresh_db)
    return fresh_db


def uc(pg, db, check=False, diff=False, **kw):
    return run_module("pg_unique_constraint", pg_args(pg, db, **kw), check=check, diff=diff)


def catalog(pg, db):
    """Everything a run could change: constraints and indexes of every user table, with validity."""
    return pg.execute(
        "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
        "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "UNION ALL SELECT i.indrelid::regclass::text, x.relname, pg_get_indexdef(i.indexrelid) || "
        "CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = x.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', "
        "'pg_toast') ORDER BY 1, 2", db)


def constraint_def(pg, db, name):
    return pg.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", db, (name,))


def test_create_then_idempotent(pg, db):
    res = uc(pg, db, table="t", columns=["a", "b"])
    assert res["changed"] is True and res["action"] == "created", res
    assert res["name"] == "t_a_b_key" and res["existing"] is None
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"
    assert any("ADD CONSTRAINT" in q for q in res["queries"])
    again = uc(pg, db, table="t", columns=["b", "a"])
    assert again["changed"] is False and again["action"] == "none" and again["queries"] == []
    assert again["name"] == "t_a_b_key" and again["existing"]["type"] == "constraint"


def test_equivalent_constraint_under_other_name_and_order(pg, db):
    before = catalog(pg, db)
    res = uc(pg, db, table="task_tags", columns=["tag_pk", "task_pk"])
    assert res["changed"] is False and res["action"] == "none", res
    assert res["name"] == "task_tags_unique"
    assert res["existing"] == {**res["existing"], "name": "task_tags_unique", "type": "constraint", "valid": True}
    assert catalog(pg, db) == before


def test_equivalent_unique_index_recognised_partial_is_not(pg, db):
    pg.execute("CREATE UNIQUE INDEX t_ba_partial ON t (b, a) WHERE a > 0", db)
    pg.execute("CREATE UNIQUE INDEX t_ba_idx ON t (b, a)", db)
    res = uc(pg, db, table="t", columns=["a", "b"])
    assert res["changed"] is False and res["name"] == "t_ba_idx" and res["existing"]["type"] == "index", res
    pg.execute("DROP INDEX t_ba_idx", db)
    res = uc(pg, db, table="t", columns=["a", "b"])
    assert res["changed"] is True and res["action"] == "created"  # a partial index never counts
    assert "t_ba_partial" in str(res.get("warnings"))


def test_refuses_while_duplicates_exist(pg, db):
    before = catalog(pg, db)
    res = uc(pg, db, table="dups", columns=["a", "b"])
    assert res["failed"] is True
    assert "3 duplicate rows in 2 groups" in res["msg"], res["msg"]
    assert "'a': '1'" in res["msg"] and res["duplicates"]["samples"][0] == {"a": "1", "b": "1"}
    assert res["queries"] == []
    assert catalog(pg, db) == before
    # check mode reports what it would do and that the real run would fail, without failing itself
    chk = uc(pg, db, check=True, table="dups", columns=["a", "b"])
    assert chk["changed"] is True and chk["action"] == "created" and chk["duplicates"]["rows"] == 3
    assert catalog(pg, db) == before


def make_invalid_index(pg, db, name="dups_a_b_key"):
    with pytest.raises(psycopg2.errors.UniqueViolation):
        pg.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON dups (a, b)', db)
    assert pg.scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", db, (name,)) is False


@pytest.mark.parametrize("concurrently", [True, False])
def test_invalid_index_left_by_failed_concurrent_build_is_rebuilt(pg, db, concurrently):
    make_invalid_index(pg, db)
    # never counted as present: with duplicates still there, it refuses
    res = uc(pg, db, table="dups", columns=["a", "b"], concurrently=concurrently)
    assert res["failed"] and "duplicate rows" in res["msg"]
    pg.execute("DELETE FROM dups d USING dups o WHERE d.a = o.a AND d.b = o.b AND d.id > o.id", db)
    chk = uc(pg, db, check=True, table="dups", columns=["a", "b"], concurrently=concurrently)
    assert chk["action"] == "rebuilt_invalid_index" and chk["existing"]["valid"] is False
    res = uc(pg, db, table="dups", columns=["a", "b"], concurrently=concurrently)
    assert res["changed"] is True and res["action"] == "rebuilt_invalid_index", res
    assert any(q.startswith("DROP INDEX") for q in res["queries"])
    assert constraint_def(pg, db, "dups_a_b_key") == "UNIQUE (a, b)"
    assert pg.scalar("SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 'dups'::regclass", db) is True
    assert uc(pg, db, table="dups", columns=["a", "b"])["changed"] is False


def test_concurrently_builds_index_then_attaches(pg, db):
    res = uc(pg, db, table="t", columns=["a", "b"], concurrently=True)
    assert res["action"] == "created_concurrently" and res["changed"], res
    assert res["queries"][0].startswith("CREATE UNIQUE INDEX CONCURRENTLY")
    assert "UNIQUE USING INDEX" in res["queries"][-1]
    assert pg.scalar("SELECT contype FROM pg_constraint WHERE conname = 't_a_b_key'", db) == "u"


def test_check_mode_and_diff_leave_catalog_unchanged(pg, db):
    before = catalog(pg, db)
    res = uc(pg, db, check=True, diff=True, table="t", columns=["a", "b"], concurrently=True)
    assert res["changed"] is True and res["action"] == "created_concurrently" and res["queries"] == []
    assert res["diff"] == {"before": "", "after": "t_a_b_key: UNIQUE (a, b)\n"}
    assert catalog(pg, db) == before
    uc(pg, db, table="t", columns=["a", "b"])
    res = uc(pg, db, check=True, diff=True, table="t", columns=["a", "b"], state="absent", name="t_a_b_key")
    assert res["action"] == "dropped" and res["diff"]["after"] == "" and "UNIQUE (a, b)" in res["diff"]["before"]
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"


def test_absent_drops_only_its_own(pg, db):
    uc(pg, db, table="t", columns=["a", "b"])
    pg.execute("ALTER TABLE t ADD CONSTRAINT t_other UNIQUE (a)", db)
    res = uc(pg, db, table="t", columns=["a", "b"], state="absent")
    assert res["failed"] and "needs name" in res["msg"]
    res = uc(pg, db, table="t", columns=["a", "b"], state="absent", name="t_a_b_key")
    assert res["changed"] and res["action"] == "dropped"
    assert constraint_def(pg, db, "t_a_b_key") is None
    assert constraint_def(pg, db, "t_other") == "UNIQUE (a)"
    assert pg.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 't_pkey'", db) == 1
    res = uc(pg, db, table="t", columns=["a", "b"], state="absent", name="t_a_b_key")
    assert res["changed"] is False and res["action"] == "none"
    res = uc(pg, db, table="t", columns=["id"], state="absent", name="t_pkey")
    assert res["failed"] and "not a UNIQUE constraint" in res["msg"]
    assert pg.scalar("SELECT count(*) FROM pg_constraint WHERE conname = 't_pkey'", db) == 1


def test_nulls_not_distinct(pg, db):
    res = uc(pg, db, table="n", columns=["a", "b"], nulls_not_distinct=True)
    assert res["changed"] and res["nulls_not_distinct"] is True, res
    assert constraint_def(pg, db, "n_a_b_key") == "UNIQUE NULLS NOT DISTINCT (a, b)"
    assert uc(pg, db, table="n", columns=["a", "b"], nulls_not_distinct=True)["changed"] is False
    # the stricter NULLS NOT DISTINCT constraint satisfies a plain request, and says so
    res = uc(pg, db, table="n", columns=["b", "a"])
    assert res["changed"] is False and res["nulls_not_distinct"] is True and res["name"] == "n_a_b_key"
    # ...but a NULLS DISTINCT constraint does not satisfy a NULLS NOT DISTINCT request on a nullable key
    pg.execute("ALTER TABLE n DROP CONSTRAINT n_a_b_key", db)
    pg.execute("ALTER TABLE n ADD CONSTRAINT n_plain UNIQUE (a, b)", db)
    res = uc(pg, db, table="n", columns=["a", "b"], nulls_not_distinct=True)
    assert res["changed"] is True and res["nullable_columns"] == ["a", "b"], res
    assert "treats NULLs as distinct" in str(res.get("warnings"))
    assert constraint_def(pg, db, "n_a_b_key") == "UNIQUE NULLS NOT DISTINCT (a, b)"
    assert constraint_def(pg, db, "n_plain") == "UNIQUE (a, b)"
    pg.execute("ALTER TABLE n DROP CONSTRAINT n_plain", db)
    # rows (NULL,NULL) twice are duplicates only when NULLs are not distinct
    pg.execute("INSERT INTO n (a, b) VALUES (7, NULL)", db)
    pg.execute("ALTER TABLE n DROP CONSTRAINT n_a_b_key", db)
    pg.execute("INSERT INTO n (a, b) VALUES (NULL, NULL)", db)
    assert uc(pg, db, check=True, table="n", columns=["a", "b"], nulls_not_distinct=True)["duplicates"]["rows"] == 1
    assert uc(pg, db, check=True, table="n", columns=["a", "b"])["duplicates"]["rows"] == 0


def test_quoted_identifiers_and_long_default_name(pg, db):
    res = uc(pg, db, schema="My Schema", table="Order", columns=["key col", "User"])
    assert res["changed"], res
    assert res["name"] == "Order_key col_User_key"
    assert constraint_def(pg, db, "Order_key col_User_key") == 'UNIQUE ("key col", "User")'
    long_col = "c" * 60
    pg.execute(f'CREATE TABLE "{"t" * 40}" (id int, "{long_col}" int)', db)
    res = uc(pg, db, table="t" * 40, columns=[long_col])
    assert res["changed"] and len(res["name"].encode()) <= 63, res
    assert uc(pg, db, table="t" * 40, columns=[long_col])["changed"] is False


def test_lock_timeout_retries_then_fails_naming_blocker(pg, db):
    holder = pg.connect(db, autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
            cur.execute("LOCK TABLE t IN ACCESS SHARE MODE")
        before = catalog(pg, db)
        start = time.monotonic()
        res = uc(pg, db, table="t", columns=["a", "b"], lock_timeout="200ms", retries=2, retry_delay=0.2)
        elapsed = time.monotonic() - start
        assert res["failed"] and "could not lock table" in res["msg"] and "after 3 attempts" in res["msg"], res
        assert f"pid {pid}" in res["msg"] and res["blocking"][0]["pid"] == pid
        assert elapsed < 10
        assert catalog(pg, db) == before
    finally:
        holder.rollback()
        holder.close()


def test_lock_released_during_retries_succeeds(pg, db):
    holder = pg.connect(db, autocommit=False)
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE t IN ACCESS SHARE MODE")
    timer = threading.Timer(0.8, lambda: (holder.rollback(), holder.close()))
    timer.start()
    try:
        res = uc(pg, db, table="t", columns=["a", "b"], lock_timeout="200ms", retries=10, retry_delay=0.3)
    finally:
        timer.join()
    assert res["changed"] and res["action"] == "created", res


@pytest.mark.parametrize(
    "kw, expect",
    [
        ({"table": "nope", "columns": ["a"]}, 'table "public"."nope" does not exist'),
        ({"table": "t", "columns": ["a", "zz"]}, 'column "zz" does not exist in table "public"."t"; its columns are: '
                                                  "id, a, b, note"),
        ({"table": "x; DROP TABLE t", "columns": ["a"]}, "looks like SQL"),
        ({"table": "t", "columns": ["a"], "name": "t_a_key; DROP TABLE t"}, "looks like SQL"),
        ({"table": "t", "columns": ["a--"]}, "looks like SQL"),
        ({"table": "t", "columns": ["a"], "name": "t_pkey"}, 'a relation named "t_pkey" already exists'),
    ],
)
def test_bad_input_fails_clearly_and_changes_nothing(pg, db, kw, expect):
    before = catalog(pg, db)
    res = uc(pg, db, **kw)
    assert res.get("failed") is True, res
    assert expect in res["msg"], res["msg"]
    assert catalog(pg, db) == before
    assert pg.scalar("SELECT count(*) FROM t", db) == 200


def test_wrong_password_and_unreachable_host(pg, db):
    before = catalog(pg, db)
    res = uc(pg, db, table="t", columns=["a", "b"], login_password="Not-The-Pass-123")
    assert res["failed"] and "authentication failed for user postgres" in res["msg"]
    assert "Not-The-Pass-123" not in str(res)
    res = uc(pg, db, table="t", columns=["a", "b"], login_port=free_port())
    assert res["failed"] and "connection refused" in res["msg"] and pg.password not in str(res)
    assert catalog(pg, db) == before


def test_through_ansible_cli_check_then_real(pg, db):
    args = pg_args(pg, db, table="t", columns=["a", "b"])
    res, proc = run_adhoc("pg_unique_constraint", args, check=True, diff=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert res["changed"] is True and res["action"] == "created" and constraint_def(pg, db, "t_a_b_key") is None
    res, proc = run_adhoc("pg_unique_constraint", args)
    assert proc.returncode == 0 and res["changed"] is True
    res, proc = run_adhoc("pg_unique_constraint", args)
    assert proc.returncode == 0 and res["changed"] is False
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"
    assert pg.password not in proc.stdout + proc.stderr


def test_ansible_doc_renders():
    proc = ansible_doc("pg_unique_constraint")
    assert proc.returncode == 0, proc.stderr
    assert "concurrently" in proc.stdout and "rebuilt_invalid_index" in proc.stdout


def test_partitioned_inherited_and_unprivileged(pg, db):
    pg.execute("CREATE TABLE p (k int NOT NULL, v int NOT NULL) PARTITION BY RANGE (k);"
               "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100);"
               "CREATE TABLE parent (a int NOT NULL); CREATE TABLE child () INHERITS (parent);", db)
    res = uc(pg, db, table="p", columns=["k", "v"], concurrently=True)
    assert res["failed"] and "partitioned table" in res["msg"] and "concurrently: false" in res["msg"]
    res = uc(pg, db, table="p", columns=["k", "v"])
    assert res["changed"] and constraint_def(pg, db, "p_k_v_key") == "UNIQUE (k, v)"
    res = uc(pg, db, table="parent", columns=["a"])
    assert res["changed"] and "inheritance" in str(res.get("warnings"))
    # a role that does not own the table: PostgreSQL's own error names the missing privilege
    pg.execute("CREATE ROLE uc_weak LOGIN PASSWORD 'weak-Pass-1'; GRANT SELECT ON t TO uc_weak", db)
    try:
        before = catalog(pg, db)
        res = uc(pg, db, table="t", columns=["a", "b"], login_user="uc_weak", login_password="weak-Pass-1")
        assert res["failed"] and "must be owner of table t" in res["msg"], res
        assert "weak-Pass-1" not in str(res)
        assert catalog(pg, db) == before
    finally:
        pg.execute('REASSIGN OWNED BY uc_weak TO postgres; DROP OWNED BY uc_weak; DROP ROLE uc_weak', db)


def test_own_valid_index_left_before_attach_is_attached(pg, db):
    """A concurrent build interrupted between CREATE INDEX and the attach leaves our valid index: attach it."""
    pg.execute("CREATE UNIQUE INDEX CONCURRENTLY t_a_b_key ON t (a, b)", db)
    chk = uc(pg, db, check=True, table="t", columns=["a", "b"], concurrently=True)
    assert chk["action"] == "attached_index" and chk["changed"] and chk["queries"] == []
    assert constraint_def(pg, db, "t_a_b_key") is None
    res = uc(pg, db, table="t", columns=["a", "b"], concurrently=True)
    assert res["action"] == "attached_index" and "UNIQUE USING INDEX" in res["queries"][0], res
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"
    assert uc(pg, db, table="t", columns=["a", "b"])["changed"] is False


# --------------------------------------------------------------------------- list mode (constraints: one call)

LEDGER = "dedup_rollout"
RUN = "20261201T000000Z"




@pytest.fixture
def ledger_db(pg, db):
    """The test database with the project's own ledger and a running deploy; task_tags has its ledger row."""
    pg.execute(render_sql("ledger.sql.j2", dedup_backup_schema=LEDGER), db)
    pg.execute(f"INSERT INTO {LEDGER}.runs (run_id, kind, status) VALUES (%s, 'deploy', 'running')", db, (RUN,))
    pg.execute(f"INSERT INTO {LEDGER}.table_runs (run_id, schema_name, table_name, natural_key, keep, order_by, "
               "status) VALUES (%s, 'public', 'task_tags', '{task_pk,tag_pk}', 'oldest', 'id', 'deduplicated')",
               db, (RUN,))
    return db


def ledger_rows(pg, db):
    return pg.execute(f"SELECT table_name, status, constraint_name, constraint_created, natural_key, keep, order_by "
                      f"FROM {LEDGER}.table_runs WHERE run_id = %s ORDER BY table_name", db, (RUN,))


def element(table, columns, always=False, **kw):
    return {"table": table, "columns": columns, "record": {"natural_key": columns, "keep": "oldest", "order_by": "id"},
            "record_always": always, **kw}


def test_list_mode_creates_keeps_existing_and_records_in_the_ledger(pg, ledger_db):
    db = ledger_db
    pg.execute("ALTER TABLE n ADD CONSTRAINT n_ab UNIQUE (a, b)", db)
    elements = [element("t", ["a", "b"]),  # created: recorded (constraint_created)
                element("task_tags", ["tag_pk", "task_pk"], always=True),  # equivalent kept: recorded (always)
                element("n", ["a", "b"])]  # equivalent kept, not always: not recorded
    res = uc(pg, db, constraints=elements, ledger_run_id=RUN, ledger_schema=LEDGER)
    assert res.get("failed") is not True and res["changed"] is True, res
    got = [(r["schema"], r["table"], r["name"], r["action"], r["changed"]) for r in res["results"]]
    assert got == [("public", "t", "t_a_b_key", "created", True),
                   ("public", "task_tags", "task_tags_unique", "none", False),
                   ("public", "n", "n_ab", "none", False)], got
    single_keys = set(uc(pg, db, check=True, table="t", columns=["a", "b"]))
    assert single_keys - {"warnings", "invocation"} <= set(res["results"][0]), single_keys - set(res["results"][0])
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"
    assert res["results"][0]["ledger"]["changed"] is True and res["results"][0]["ledger"]["before"] is None
    assert res["results"][1]["ledger"]["before"]["status"] == "deduplicated"
    assert "ledger" not in res["results"][2]
    assert ledger_rows(pg, db) == [
        ("t", "constrained", "t_a_b_key", True, ["a", "b"], "oldest", "id"),
        ("task_tags", "constrained", "task_tags_unique", False, ["tag_pk", "task_pk"], "oldest", "id"),
    ]
    # the same call again: nothing to create, the always-recorded row is as it was: no change at all
    again = uc(pg, db, constraints=elements, ledger_run_id=RUN, ledger_schema=LEDGER)
    assert again["changed"] is False, again
    assert [r["action"] for r in again["results"]] == ["none", "none", "none"]
    assert again["results"][1]["ledger"]["changed"] is False and "ledger" not in again["results"][0]
    assert ledger_rows(pg, db)[0][3] is True  # constraint_created stays as the creating run wrote it
    # without ledger_run_id nothing is recorded
    pg.execute(f"DELETE FROM {LEDGER}.table_runs", db)
    assert all("ledger" not in r for r in uc(pg, db, constraints=elements)["results"])
    assert ledger_rows(pg, db) == []


def test_list_mode_goes_on_past_a_failed_table_and_names_it(pg, ledger_db):
    db = ledger_db
    elements = [element("t", ["a", "b"]), element("dups", ["a", "b"], always=True), element("n", ["a", "b"])]
    res = uc(pg, db, constraints=elements, ledger_run_id=RUN, ledger_schema=LEDGER)
    assert res["failed"] is True, res
    assert '"public"."dups" still has 3 duplicate rows in 2 groups' in res["msg"], res["msg"]
    assert res["failed_table"] == '"public"."dups"' and res["duplicates"]["rows"] == 3
    assert res["failed_tables"] == ['"public"."dups"']
    assert [(r["table"], r.get("action"), r.get("failed", False)) for r in res["results"]] == \
        [("t", "created", False), ("dups", None, True), ("n", "created", False)]
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)" and constraint_def(pg, db, "n_a_b_key")
    assert constraint_def(pg, db, "dups_a_b_key") is None
    assert [r[0] for r in ledger_rows(pg, db)] == ["n", "t", "task_tags"]  # dups not recorded
    # refused before anything runs: a bad name anywhere in the list, or table/columns beside constraints
    before = catalog(pg, db)
    res = uc(pg, db, constraints=[element("n", ["a", "b"]), element("t", ["a--"])])
    assert res["failed"] and "looks like SQL" in res["msg"] and res["results"] == [], res
    res = uc(pg, db, constraints=[element("n", ["a", "b"])], table="n", columns=["a"])
    assert res["failed"] and "mutually exclusive" in res["msg"], res
    assert catalog(pg, db) == before


def test_list_mode_check_mode_changes_nothing(pg, ledger_db):
    db = ledger_db
    before, rows = catalog(pg, db), ledger_rows(pg, db)
    elements = [element("t", ["a", "b"]), element("task_tags", ["task_pk", "tag_pk"], always=True),
                element("dups", ["a", "b"])]
    res = uc(pg, db, check=True, diff=True, constraints=elements, ledger_run_id=RUN, ledger_schema=LEDGER)
    assert res.get("failed") is not True and res["changed"] is True, res
    assert [(r["action"], r["changed"], r["queries"]) for r in res["results"]] == [
        ("created", True, []), ("none", False, []), ("created", True, [])]
    assert res["results"][2]["duplicates"]["rows"] == 3  # the real run would refuse: said, not failed
    assert res["results"][0]["ledger"]["after"]["constraint_created"] is True
    assert res["diff"][0] == {"before": "", "after": "t_a_b_key: UNIQUE (a, b)\n"}
    assert catalog(pg, db) == before and ledger_rows(pg, db) == rows


def test_list_mode_progress_follows_the_table_being_worked_on(pg, db):
    """In list mode the action plugin runs the module in the background (sizes unknown = long) and
    pg_migrate_progress kind=index with tables names the table whose DDL runs (here: waits for a lock)."""
    holder = pg.connect(db, autocommit=False)
    out = {}
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
            cur.execute("LOCK TABLE n IN ACCESS SHARE MODE")
        args = pg_args(pg, db, constraints=[{"table": "t", "columns": ["a", "b"]}, {"table": "n", "columns": ["a"]}],
                       lock_timeout="6s", retries=0)
        worker = threading.Thread(target=lambda: out.update(zip(("res", "proc"), run_adhoc("pg_unique_constraint",
                                                                                           args))))
        worker.start()
        seen, deadline = None, time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:
            progress = run_module("pg_migrate_progress", pg_args(pg, db, kind="index", wait=0,
                                                                 tables=[["public", "t"], ["public", "n"]]))
            if progress.get("running") and progress["msg"].startswith("public.n:"):
                seen = progress
                break
            time.sleep(0.2)
        worker.join(timeout=120)
    finally:
        holder.rollback()
        holder.close()
    assert seen is not None, out
    assert "waiting for a lock" in seen["msg"] and str(pid) in seen["msg"], seen
    res, proc = out["res"], out["proc"]
    assert proc.returncode != 0 and "FAILED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert res["background"] is True and res["failed_table"] == '"public"."n"', res
    assert 'could not lock table "public"."n"' in res["msg"] and res["blocking"][0]["pid"] == pid
    assert [(r["table"], r.get("failed", False)) for r in res["results"]] == [("t", False), ("n", True)]
    bad = run_module("pg_migrate_progress", pg_args(pg, db, kind="index", wait=0, tables=[["public"]]))
    assert bad["failed"] and "pairs" in bad["msg"]


def test_list_mode_in_a_play_prints_the_phase_of_the_table_being_built(pg, db, tmp_path):
    """One list-mode task over a small and a big table (sizes from preflight_plan, as in the role): it runs in the
    background and the progress line follows the build of the big one (CIC waiting for a writer's transaction)."""
    import sys  # noqa: PLC0415

    from test_progress import hold_until  # noqa: PLC0415

    pg.execute("CREATE TABLE public.big (id serial PRIMARY KEY, k int NOT NULL);"
               "INSERT INTO public.big (k) SELECT g FROM generate_series(1, 2000) g", db)
    writer = pg.connect(db, autocommit=False)  # an open transaction that wrote: CIC waits for it
    with writer.cursor() as cur:
        cur.execute("INSERT INTO public.big (k) VALUES (100000)")

    def build_waits(cur):
        cur.execute("SELECT count(*) FROM pg_stat_progress_create_index WHERE phase LIKE 'waiting for writers%'")
        return cur.fetchone()[0] > 0

    releaser = hold_until(writer, pg.dsn(db), build_waits, seconds=3.5)
    play = tmp_path / "list.yml"
    play.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Every constraint in one call
      pg_unique_constraint:
        login_host: 127.0.0.1
        login_port: {pg.port}
        login_db: {db}
        login_user: {pg.superuser}
        login_password: "{{{{ pw }}}}"
        constraints:
          - {{table: t, columns: [a, b]}}
          - {{table: big, columns: [k]}}
        concurrently: true
        lock_timeout: 60s
      register: out
    - name: Show the results
      ansible.builtin.debug:
        msg: "tables={{{{ out.results | map(attribute='table') | join(',') }}}} changed={{{{ out.changed }}}}"
""")
    plan = {"tables": [{"schema": "public", "table": "t", "heap_size": 8192},
                       {"schema": "public", "table": "big", "heap_size": 10 * 1024 ** 3}]}
    res = run_playbook(play, "-i", "localhost,", "-c", "local",
                       extra_vars={"pw": pg.password, "ansible_python_interpreter": sys.executable,
                                   "dedup_progress_interval": 1, "dedup_progress_min_size": "1MB",
                                   "preflight_plan": plan})
    releaser.join(timeout=5)
    writer.close()
    assert res.rc == 0, res.output[-4000:]
    assert re.search(r"^\[localhost\] public\.big: UNIQUE index build: waiting for writers before build",
                     res.stdout, re.M), res.output[-4000:]
    assert "tables=t,big changed=True" in res.stdout, res.output[-4000:]
    assert constraint_def(pg, db, "t_a_b_key") == "UNIQUE (a, b)"
    assert constraint_def(pg, db, "big_k_key") == "UNIQUE (k)"
