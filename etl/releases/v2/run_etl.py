#!/usr/bin/env python3
"""Breezeway ETL entry point: ``run_etl.py REGION ENTITY`` (e.g. ``run_etl.py nashville properties``).

Connection settings come from the JSON file named by ``ETL_DB_CONFIG`` (default:
``<release>/../../shared/db.json`` with host, port, dbname, user); the password comes from libpq
(``~/.pgpass`` of the user running the ETL), never from the command line.
Prints one line per table (rows sent / affected); exits non-zero on failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RELEASE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RELEASE_DIR))

from config import ENTITIES  # noqa: E402
from etl_base import Etl  # noqa: E402


def db_config() -> dict:
    path = Path(os.environ.get("ETL_DB_CONFIG") or RELEASE_DIR.parent.parent / "shared" / "db.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.pop("password", None)  # never taken from a file: libpq reads ~/.pgpass
    return {k: cfg[k] for k in ("host", "port", "dbname", "user") if k in cfg}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ENTITIES:
        print(f"usage: run_etl.py REGION {{{','.join(ENTITIES)}}}", file=sys.stderr)
        return 2
    region, entity = argv
    try:
        etl = Etl(db_config(), RELEASE_DIR)
        results = etl.run(region, entity)
    except Exception as exc:  # report and fail: cron mails/logs the line, the exit code tells
        print(f"run_etl: {region} {entity}: error: {exc}", file=sys.stderr)
        return 1
    for table, sent, affected in results:
        print(f"table={table} sent={sent} affected={affected}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
