"""Breezeway ETL core, release v1: load parents, then their children, with execute_values.

KNOWN BUG (fixed in v2): children are inserted with ``ON CONFLICT DO NOTHING`` and no conflict
target. A table without a UNIQUE constraint never conflicts, so every run inserts every child
again; only ``task_tags`` (which has ``task_tags_unique``) stays clean.
"""

from __future__ import annotations

from pathlib import Path

import fixture_api
import psycopg2
from config import CHILD_TABLES, PARENTS, SCHEMA, children_of
from psycopg2 import sql
from psycopg2.extras import Json, execute_values


def adapt(v):
    return Json(v) if isinstance(v, dict) else v


class Etl:
    def __init__(self, dbconf: dict, release_dir: Path):
        self.dbconf = dbconf
        self.release_dir = release_dir

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
        rows = []
        for source_id, rec in records:
            rows.append(tuple([pks[source_id]] + [adapt(rec[c]) for c in cols[1:]]))
        if not rows:
            return
        # BUG: no conflict target -> nothing ever conflicts on a table without a UNIQUE constraint.
        query = sql.SQL("INSERT INTO {tbl} ({cols}) VALUES %s ON CONFLICT DO NOTHING").format(
            tbl=sql.Identifier(SCHEMA, table),
            cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
        )
        execute_values(cur, query, rows, page_size=len(rows))
        totals[table][0] += len(rows)
        totals[table][1] += max(cur.rowcount, 0)
