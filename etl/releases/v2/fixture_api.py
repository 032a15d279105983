"""A deterministic stand-in for the Breezeway API.

``fetch(region, entity)`` returns the batches (pages) the real API would return, generated from a
fixed seed derived from (region, entity): the same call always returns the same records. One batch
repeats a child record, as the real API does now and then.

Payload values are pure functions of the child id ``n`` and the data revision ``rev`` (environment
variable ``ETL_FIXTURE_REVISION``, default 0, simulates the upstream data changing). The lab's SQL
fill uses the same formulas, so a record loaded by the ETL equals the lab's rows for the same key.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from config import CHILD_TABLES, PARENTS, children_of

PARENTS_PER_RUN = 4
BATCH_SIZE = 2
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def revision() -> int:
    return int(os.environ.get("ETL_FIXTURE_REVISION", "0"))


def child_id(source_id: int, c: int) -> int:
    """The API id of the c-th (1-based) child of parent ``source_id``."""
    return source_id * 100 + c


def value(kind: str, column: str, n: int, rev: int, region: str):
    if kind == "text":
        return f"{column}-{n}-r{rev}"
    if kind == "int":
        return (n * 7 + rev) % 97
    if kind == "bool":
        return (n + rev) % 2 == 0
    if kind == "numeric":
        return (Decimal(n % 1000) * Decimal("0.25") + rev).quantize(Decimal("0.01"))
    if kind == "jsonb":
        return {"n": n, "rev": rev}
    if kind == "timestamptz":
        return EPOCH + timedelta(minutes=n, days=rev)
    if kind == "region":
        return region
    raise ValueError(f"unknown payload kind {kind!r}")


def parent_record(region: str, entity: str, source_id: int, rev: int) -> dict:
    label = PARENTS[entity]["label"]
    return {
        "region_code": region,
        "source_id": source_id,
        "name": f"{label} {region} #{source_id}",
        "details": {"rev": rev},
    }


def child_record(table: str, region: str, source_id: int, c: int, rev: int) -> dict:
    cfg = CHILD_TABLES[table]
    n = child_id(source_id, c)
    rec = {cfg["child_id"]: n}
    for column, kind in cfg["payload"]:
        rec[column] = value(kind, column, n, rev, region)
    return rec


def fetch(region: str, entity: str, rev: int | None = None) -> list[dict]:
    """Batches: ``[{"parents": [...], "children": {table: [(source_id, record), ...]}}, ...]``."""
    if entity not in PARENTS:
        raise ValueError(f"unknown entity {entity!r} (expected one of {', '.join(PARENTS)})")
    if not region or not region.isidentifier():
        raise ValueError(f"bad region {region!r}")
    rev = revision() if rev is None else rev
    rng = random.Random(f"breezeway-fixture:{region}:{entity}")
    sources = list(range(1, PARENTS_PER_RUN + 1))
    rng.shuffle(sources)
    batches = []
    for start in range(0, len(sources), BATCH_SIZE):
        chunk = sources[start:start + BATCH_SIZE]
        children: dict[str, list] = {}
        for table in children_of(entity):
            rows = []
            for s in chunk:
                for c in range(1, CHILD_TABLES[table]["fanout"] + 1):
                    rows.append((s, child_record(table, region, s, c, rev)))
            children[table] = rows
        batches.append({"parents": [parent_record(region, entity, s, rev) for s in chunk], "children": children})
    # The API repeats one child record inside one batch (same key, same payload).
    victim = batches[rng.randrange(len(batches))]
    for table in children_of(entity):
        rows = victim["children"][table]
        rows.append(rows[rng.randrange(len(rows))])
    return batches
