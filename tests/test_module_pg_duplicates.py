"""pg_duplicates against the harness's real PostgreSQL: exact counts on purpose-built tables."""

from __future__ import annotations

import pytest
from modkit import pg_args, run_module

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
