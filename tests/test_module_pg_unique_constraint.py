"""pg_unique_constraint against the harness's real PostgreSQL: idempotence by meaning, refusals, recovery."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from harness import free_port
from modkit import ansible_doc, pg_args, run_adhoc, run_module

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
