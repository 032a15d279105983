"""Issue 15: the divergent-duplicates refusal names only the columns that differ (with values), and the plan
finds the relations pg_dump could not read before a dump fails on them. Module-level, fast."""

from __future__ import annotations

import uuid

from psycopg2 import sql

from modkit import pg_args, run_module

SETUP = """
CREATE TABLE public.one_col (id serial PRIMARY KEY, k int, payload text, note text, loaded_at timestamptz);
-- key 1: only payload differs (note equal, loaded_at ignored); key 2: identical copies; key 3: single
INSERT INTO public.one_col (k, payload, note, loaded_at) VALUES
  (1, 'a', 'same', now()), (1, 'b', 'same', now() - interval '1 day'), (1, 'a', 'same', now()),
  (2, 'x', 'n', now()), (2, 'x', 'n', now()),
  (3, 'z', 'n', now());
CREATE TABLE public.two_cols (id serial PRIMARY KEY, k text, a int, b text, c text);
-- key 'p': a differs (1 / NULL), c differs by a long value; b equal. key NULL: b differs
INSERT INTO public.two_cols (k, a, b, c) VALUES
  ('p', 1, 'same', 'short'), ('p', NULL, 'same', repeat('L', 200)),
  (NULL, 5, 'u', 'c'), (NULL, 5, 'v', 'c');
CREATE TABLE public.no_pk (k int, v text);
INSERT INTO public.no_pk VALUES (1, 'same'), (1, 'same');
"""


def dups(pg, db, tables, **kw):
    res = run_module("pg_duplicates", pg_args(pg, db, tables=tables, ignore_columns=["id", "loaded_at"], **kw))
    assert not res.get("failed"), res
    return {t["table"]: t for t in res["tables"]}


def test_divergent_columns_name_only_the_one_column_that_differs(pg, fresh_db):
    pg.execute(SETUP, fresh_db)
    t = dups(pg, fresh_db, [{"name": "one_col", "natural_key": ["k"]}])["one_col"]
    assert t["divergent_groups"] == 1
    assert t["compared_columns"] == ["payload", "note"]
    assert t["divergent_columns"] == ["payload"]
    assert t["divergent_sample"] == [{"key": {"k": "1"}, "values": {"payload": ["a", "b"]}}]


def test_divergent_columns_name_both_columns_null_aware_and_truncated(pg, fresh_db):
    pg.execute(SETUP, fresh_db)
    t = dups(pg, fresh_db, [{"name": "two_cols", "natural_key": ["k"]}])["two_cols"]
    assert t["divergent_groups"] == 2
    assert t["divergent_columns"] == ["a", "b", "c"]  # a (1 vs NULL) and c for 'p', b for the NULL key
    by_key = {s["key"]["k"]: s["values"] for s in t["divergent_sample"]}
    assert set(by_key["p"]) == {"a", "c"}
    assert sorted(by_key["p"]["a"], key=str) == ["1", None]
    long = [v for v in by_key["p"]["c"] if v != "short"]
    assert len(long) == 1 and long[0].startswith("L" * 50 + "... (md5 ") and len(long[0]) < 70
    assert by_key[None] == {"b": ["u", "v"]}


def test_no_divergence_and_no_samples_return_empty_detail(pg, fresh_db):
    pg.execute(SETUP, fresh_db)
    ts = dups(pg, fresh_db, [{"name": "no_pk", "natural_key": ["k"]}, {"name": "one_col", "natural_key": ["k"]}],
              samples=0)
    assert ts["no_pk"]["divergent_columns"] == [] and ts["no_pk"]["divergent_sample"] == []
    assert ts["one_col"]["divergent_groups"] == 1 and ts["one_col"]["divergent_columns"] == []


def test_plan_reports_relations_pg_dump_could_not_read(pg, fresh_db):
    """A role owning the target schema but without SELECT on another schema's table and sequence: the plan's
    server.dump_unreadable names them (the backup schema and the role's own tables are not listed)."""
    role = "dumpless_" + uuid.uuid4().hex[:8]
    pg.execute(sql.SQL(
        "CREATE ROLE {r} LOGIN PASSWORD 'pw'; CREATE SCHEMA s AUTHORIZATION {r}; "
        "CREATE TABLE s.items (id int PRIMARY KEY, k int); ALTER TABLE s.items OWNER TO {r}; "
        "CREATE SCHEMA other; CREATE TABLE other.secret (id serial PRIMARY KEY); "
        "CREATE TABLE other.granted (id int); GRANT SELECT ON other.granted TO {r}; "
        "CREATE SCHEMA dedup_rollout AUTHORIZATION {r}; CREATE TABLE dedup_rollout.not_dumped (id int)"
    ).format(r=sql.Identifier(role)).as_string(pg.connect(fresh_db)), fresh_db)
    args = {**pg_args(pg, fresh_db, login_user=role, login_password="pw"), "schema": "s",
            "tables": [{"name": "items", "natural_key": ["k"]}], "run_id": "r1"}
    res = run_module("pg_dedup_plan", args)
    assert not res.get("failed"), res
    assert res["server"]["dump_unreadable"] == {
        "count": 2, "relations": ["other.secret (table)", "other.secret_id_seq (sequence)"]}
    pg.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA other TO {r}; "
                       "GRANT SELECT ON ALL SEQUENCES IN SCHEMA other TO {r}").format(
        r=sql.Identifier(role)).as_string(pg.connect(fresh_db)), fresh_db)
    ok = run_module("pg_dedup_plan", args)
    assert ok["server"]["dump_unreadable"] == {"count": 0, "relations": []}
