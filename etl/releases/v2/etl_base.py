"""Breezeway ETL core, release v2: load parents, then their children, with execute_values.

The fix: children are upserted with ``ON CONFLICT (natural key) DO UPDATE SET <non-key columns>``
(rows whose payload did not change are left alone), and every batch is deduplicated by natural key
before it is sent: a batch that carries the same key twice would otherwise fail with
"ON CONFLICT DO UPDATE command cannot affect row a second time". Natural keys come from
``natural_keys.json`` in the release directory when present, else from config.py.
Requires the UNIQUE constraints on the natural keys (added by the dedup migration).
"""

from __future__ import annotations

from pathlib import Path

import fixture_api
import psycopg2
from config import CHILD_TABLES, PARENTS, SCHEMA, children_of, load_natural_keys
from psycopg2 import sql
from psycopg2.extras import Json, execute_values


def adapt(v):
    return Json(v) if isinstance(v, dict) else v


def dedup_by_key(rows: list[tuple], cols: list[str], key: list[str]) -> list[tuple]:
    """Keep the last occurrence of each natural key, in first-seen order."""
    idx = [cols.index(c) for c in key]
    out: dict[tuple, tuple] = {}
    for row in rows:
        out[tuple(row[i] for i in idx)] = row
    return list(out.values())


class Etl:
    def __init__(self, dbconf: dict, release_dir: Path):
        self.dbconf = dbconf
        self.release_dir = release_dir
        self.natural_keys = load_natural_keys(release_dir)

    def run(self, region: str, entity: str) -> list[tuple[str, int, int]]:
        batches = fixture_api.fetch(region, entity)
        totals: dict[str, list[int]] = {PARENTS[entity]["table"]: [0, 0]}
        for table in children_of(entity):
            totals[table] = [0, 0]
        conn = psycopg2.connect(application_name="breezeway-etl", **self.dbconf)
        try:
            with conn, conn.cursor() as cur:
                for batch in batches:
                    pks = self._upsert_parents(cur, entity, batch["parents"], totals)
                    for table in children_of(entity):
                        self._upsert_children(cur, table, batch["children"][table], pks, totals)
        finally:
            conn.close()
        return [(t, s, a) for t, (s, a) in totals.items()]

    def _upsert_parents(self, cur, entity: str, parents: list[dict], totals) -> dict:
        pcfg = PARENTS[entity]
        cols = ["region_code", "source_id", "name", "details"]
        query = sql.SQL(
            "INSERT INTO {tbl} ({cols}) VALUES %s "
            "ON CONFLICT ({key}) DO UPDATE SET name = EXCLUDED.name, details = EXCLUDED.details, "
            "updated_at = now() RETURNING id, region_code, source_id"
        ).format(
            tbl=sql.Identifier(SCHEMA, pcfg["table"]),
            cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            key=sql.SQL(", ").join(map(sql.Identifier, pcfg["natural_key"])),
        )
        rows = [tuple(adapt(p[c]) for c in cols) for p in parents]
        returned = execute_values(cur, query, rows, page_size=max(len(rows), 1), fetch=True)
        totals[pcfg["table"]][0] += len(rows)
        totals[pcfg["table"]][1] += len(returned)
        return {source_id: pk for pk, _region, source_id in returned}

    def _upsert_children(self, cur, table: str, records: list, pks: dict, totals) -> None:
        cfg = CHILD_TABLES[table]
        cols = [cfg["fk"], cfg["child_id"]] + [c for c, _kind in cfg["payload"]]
        key = self.natural_keys[table]
        missing = [c for c in key if c not in cols]
        if missing:
            raise ValueError(f"{table}: natural key column(s) {missing} are not loaded by this ETL")
        rows = [tuple([pks[source_id]] + [rec[c] for c in cols[1:]]) for source_id, rec in records]
        rows = dedup_by_key([tuple(adapt(v) for v in r) for r in rows], cols, key) if rows else rows
        if not rows:
            return
        ident = sql.Identifier
        rest = [c for c in cols if c not in key]
        if rest:
            action = sql.SQL("DO UPDATE SET {sets} WHERE ({cur}) IS DISTINCT FROM ({new})").format(
                sets=sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(ident(c), ident(c)) for c in rest),
                cur=sql.SQL(", ").join(sql.SQL("t.{}").format(ident(c)) for c in rest),
                new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in rest),
            )
        else:
            action = sql.SQL("DO NOTHING")
        query = sql.SQL("INSERT INTO {tbl} AS t ({cols}) VALUES %s ON CONFLICT ({key}) {action}").format(
            tbl=ident(SCHEMA, table),
            cols=sql.SQL(", ").join(map(ident, cols)),
            key=sql.SQL(", ").join(map(ident, key)),
            action=action,
        )
        execute_values(cur, query, rows, page_size=len(rows))
        totals[table][0] += len(rows)
        totals[table][1] += max(cur.rowcount, 0)
