"""pg_duplicates against the harness's real PostgreSQL: exact counts on purpose-built tables."""

from __future__ import annotations

import time

import pytest

from modkit import ansible_doc, pg_args, run_adhoc, run_module

SETUP = """
CREATE TABLE public.exact (id serial PRIMARY KEY, a int, b text, payload text, created_at timestamptz DEFAULT now());
-- keys (1,x) x3 identical, (2,y) x2 identical, (3,z) x1
INSERT INTO public.exact (a, b, payload) VALUES
  (1,'x','p'), (1,'x','p'), (1,'x','p'), (2,'y','q'), (2,'y','q'), (3,'z','r');
CREATE TABLE public.divergent (id bigserial PRIMARY KEY, a int, b text, payload text, updated_at timestamptz);
-- (1,x): p,p,DIFF -> divergent group of 3; (2,y): q,q same; (3,z): s,t divergent of 2; (4,w) single
INSERT INTO public.divergent (a, b, payload, updated_at) VALUES
  (1,'x','p',now()), (1,'x','p',now() - interval '1 day'), (1,'x','DIFF',now()),
  (2,'y','q',now()), (2,'y','q',now()),
  (3,'z','s',now()), (3,'z','t',now()),
  (4,'w','u',now());
CREATE TABLE public.nullkeys (id int PRIMARY KEY, a int, b text, payload text);
-- (NULL,x) x2, (1,NULL) x1, (NULL,NULL) x3, (2,y) x1
INSERT INTO public.nullkeys VALUES
  (1,NULL,'x','p'), (2,NULL,'x','p'), (3,1,NULL,'p'), (4,NULL,NULL,'p'), (5,NULL,NULL,'p'), (6,NULL,NULL,'p'),
  (7,2,'y','p');
CREATE TABLE public.clean (id int PRIMARY KEY, a int, b text);
INSERT INTO public.clean SELECT g, g, 'k' || g FROM generate_series(1, 50) g;
CREATE TABLE public.empty (id int PRIMARY KEY, a int, b text);
CREATE SCHEMA "Weird Schema";
CREATE TABLE "Weird Schema"."Select" ("User" int, "key col" text, "it's" text, "order" text);
INSERT INTO "Weird Schema"."Select" VALUES (1,'a','x','o'), (1,'a','y','o'), (2,'b','z','o');
"""


@pytest.fixture
def db(pg, fresh_db):
    pg.execute(SETUP, fresh_db)
    return fresh_db


def dup(pg, db, tables, **kw):
    return run_module("pg_duplicates", pg_args(pg, db, tables=tables, **kw))


def test_exact_duplicates(pg, db):
    res = dup(pg, db, [{"name": "exact", "natural_key": ["a", "b"]}])
    assert res["changed"] is False, res
    t = res["tables"][0]
    assert (t["total_rows"], t["distinct_keys"], t["duplicate_rows"], t["duplicate_groups"], t["largest_group"]) \
        == (6, 3, 3, 2, 3)
    assert t["null_key_rows"] == 0 and t["divergent_groups"] == 0 and t["divergent_rows"] == 0
    assert t["compared_columns"] == ["payload"]
    assert t["sample_duplicate_keys"][0] == {"a": "1", "b": "x"}
    assert len(t["sample_duplicate_keys"]) == 2
    assert t["nulls"] == "not distinct"


def test_divergent_duplicates_ignore_columns(pg, db):
    t = dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"]}])["tables"][0]
    assert (t["total_rows"], t["distinct_keys"], t["duplicate_rows"], t["duplicate_groups"], t["largest_group"]) \
        == (8, 4, 4, 3, 3)
    # updated_at differs inside (1,x) but is ignored by default; payload differs in (1,x) and (3,z)
    assert t["compared_columns"] == ["payload"]
    assert (t["divergent_groups"], t["divergent_rows"]) == (2, 5)
    assert sorted(k["a"] for k in t["sample_divergent_keys"]) == ["1", "3"]
    # per-table ignore_columns replaces the global list: payload ignored, updated_at compared; only (1,x) has
    # different updated_at values (now() is the same for every row of one INSERT)
    t2 = dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"], "ignore_columns": ["payload"]}])["tables"][0]
    assert t2["compared_columns"] == ["updated_at"]
    assert (t2["divergent_groups"], t2["divergent_rows"]) == (1, 3)


def test_null_keys_grouped_not_distinct(pg, db):
    t = dup(pg, db, [{"name": "nullkeys", "natural_key": ["a", "b"]}])["tables"][0]
    assert (t["total_rows"], t["distinct_keys"], t["duplicate_rows"], t["duplicate_groups"], t["largest_group"]) \
        == (7, 4, 3, 2, 3)
    assert t["null_key_rows"] == 6
    assert t["null_key_columns"] == {"a": 5, "b": 4}
    assert t["divergent_groups"] == 0
    assert {"a": None, "b": None} in t["sample_null_keys"] and len(t["sample_null_keys"]) == 3
    assert t["nulls"] == "not distinct"


def test_clean_empty_and_totals_in_input_order(pg, db):
    res = dup(pg, db, [
        {"name": "clean", "natural_key": ["a", "b"], "keep": "oldest"},  # extra keys of dedup_tables are accepted
        {"name": "empty", "natural_key": ["a"]},
        {"name": "exact", "natural_key": ["a", "b"]},
    ], samples=1)
    names = [t["table"] for t in res["tables"]]
    assert names == ["clean", "empty", "exact"]
    clean, empty, exact = res["tables"]
    assert (clean["total_rows"], clean["distinct_keys"], clean["duplicate_rows"], clean["duplicate_groups"]) \
        == (50, 50, 0, 0)
    assert clean["largest_group"] == 1 and clean["sample_duplicate_keys"] == []
    assert (empty["total_rows"], empty["distinct_keys"], empty["duplicate_rows"], empty["largest_group"]) \
        == (0, 0, 0, 0)
    assert empty["key_fingerprint"] == "0" and empty["sample_null_keys"] == []
    assert len(exact["sample_duplicate_keys"]) == 1
    assert res["totals"]["total_rows"] == 56 and res["totals"]["duplicate_rows"] == 3
    assert res["totals"]["distinct_keys"] == 53 and res["totals"]["tables"] == 3
    assert all(t["schema"] == "public" for t in res["tables"])


def test_hostile_but_legal_identifiers(pg, db):
    res = dup(pg, db, [{"name": "Select", "natural_key": ["User", "key col"]}], schema="Weird Schema",
              fingerprint_ids=True)
    t = res["tables"][0]
    assert (t["total_rows"], t["distinct_keys"], t["duplicate_rows"], t["divergent_groups"]) == (3, 2, 1, 1)
    assert t["compared_columns"] == ["it's", "order"]
    assert t["id_fingerprint"] not in (None, "0")  # no primary key: the whole rows are fingerprinted
    assert t["sample_duplicate_keys"] == [{"User": "1", "key col": "a"}]


def test_fingerprints_survive_dedup(pg, db):
    before = dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"]}], fingerprint_ids=True)["tables"][0]
    assert dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"]}])["tables"][0]["id_fingerprint"] is None
    pg.execute("DELETE FROM divergent d USING divergent o WHERE d.a = o.a AND d.b = o.b AND d.id > o.id", db)
    after = dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"]}], fingerprint_ids=True)["tables"][0]
    assert after["duplicate_rows"] == 0 and after["total_rows"] == 4
    assert after["key_fingerprint"] == before["key_fingerprint"]
    assert after["id_fingerprint"] != before["id_fingerprint"]
    pg.execute("DELETE FROM divergent WHERE a = 4", db)
    gone = dup(pg, db, [{"name": "divergent", "natural_key": ["a", "b"]}])["tables"][0]
    assert gone["key_fingerprint"] != before["key_fingerprint"]


def test_single_scan_read_only_and_check_mode(pg, db):
    def seq_scans():
        return pg.scalar("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'divergent'", db)

    pg.execute("SELECT pg_stat_reset()", db)
    start = seq_scans() or 0
    res = run_module("pg_duplicates", pg_args(pg, db, tables=[{"name": "divergent", "natural_key": ["a", "b"]}]),
                     check=True)
    assert res["changed"] is False and res["tables"][0]["duplicate_rows"] == 4
    deadline = time.time() + 5
    while time.time() < deadline and (seq_scans() or 0) == start:
        time.sleep(0.1)
    assert 1 <= (seq_scans() or 0) - start <= 2
    # the query runs in a READ ONLY transaction: nothing it does can write
    assert pg.scalar("SELECT count(*) FROM divergent", db) == 8


@pytest.mark.parametrize(
    "tables, schema, expect",
    [
        ([{"name": "nope", "natural_key": ["a"]}], "public", 'table "public"."nope" does not exist'),
        ([{"name": "exact", "natural_key": ["a", "zz"]}], "public", 'column "zz" does not exist in table'),
        ([{"name": "x; DROP TABLE exact", "natural_key": ["a"]}], "public", "looks like SQL"),
        ([{"name": "exact", "natural_key": ["a"]}], "nosuch", 'schema "nosuch" does not exist'),
        ([{"name": "exact", "natural_key": []}], "public", "needs natural_key"),
    ],
)
def test_bad_input_fails_clearly(pg, db, tables, schema, expect):
    res = dup(pg, db, tables, schema=schema)
    assert res.get("failed") is True, res
    assert expect in res["msg"], res["msg"]
    if "zz" in expect:
        assert "id, a, b, payload, created_at" in res["msg"]
    if "nope" in expect:
        assert "clean" in res["msg"] and "exact" in res["msg"]  # lists the tables that do exist
    assert pg.scalar("SELECT count(*) FROM exact", db) == 6  # nothing dropped


def test_wrong_password_and_unreachable_host(pg, db):
    from harness import free_port

    res = run_module("pg_duplicates", pg_args(pg, db, login_password="Wrong-Secret-77",
                                              tables=[{"name": "exact", "natural_key": ["a"]}]))
    assert res["failed"] and "authentication failed" in res["msg"]
    assert "Wrong-Secret-77" not in res["msg"] and pg.password not in str(res)
    res = run_module("pg_duplicates", pg_args(pg, db, login_port=free_port(), connect_timeout=3,
                                              tables=[{"name": "exact", "natural_key": ["a"]}]))
    assert res["failed"] and "connection refused" in res["msg"] and "127.0.0.1" in res["msg"]
    assert pg.password not in res["msg"]
    res = run_module("pg_duplicates", pg_args(pg, "no_such_db", tables=[{"name": "exact", "natural_key": ["a"]}]))
    assert res["failed"] and "database no_such_db does not exist" in res["msg"]


def test_pgpass_and_env_fallback(pg, db, tmp_path, monkeypatch):
    """Unset options fall back to PG* variables and ~/.pgpass, as libpq does."""
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:{pg.superuser}:{pg.password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", pg.superuser)
    monkeypatch.setenv("PGDATABASE", db)
    res = run_module("pg_duplicates", {"tables": [{"name": "exact", "natural_key": ["a", "b"]}]})
    assert res.get("failed") is not True, res
    assert res["tables"][0]["duplicate_rows"] == 3


def test_through_ansible_cli(pg, db):
    res, proc = run_adhoc("pg_duplicates", pg_args(pg, db, tables=[{"name": "exact", "natural_key": ["a", "b"]}]),
                          check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert res["changed"] is False and res["tables"][0]["duplicate_rows"] == 3
    assert pg.password not in proc.stdout + proc.stderr


def test_ansible_doc_renders():
    proc = ansible_doc("pg_duplicates")
    assert proc.returncode == 0, proc.stderr
    assert "natural_key" in proc.stdout and "key_fingerprint" in proc.stdout
