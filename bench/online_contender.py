"""Online mode's migration step on its own, for bench/run_bench.py (issue 9's benchmark row).

Runs exactly what roles/migrate/tasks/online.yml runs per table (module_utils/dedup_online.OnlineDedup, the
code of library/pg_online_dedup.py) without ansible around it: the ledger from sql/ledger.sql.j2, a deploy
row, then every table in turn. The caller measures wall time, WAL and the writer's stalls around it.

    from online_contender import run_online
    figures = run_online(dsn, "breezeway", TABLES, run_id="bench-online")

``dsn``: psycopg2.connect() keywords (host, port, dbname, user, password). ``tables``: dedup_tables entries
(name, natural_key, optional keep/order_by). Returns {"seconds", "rows_removed", "batches",
"longest_batch_seconds", "longest_lock_seconds", "tables": {name: module result without queries}}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _import_paths() -> None:
    import ansible.module_utils

    if str(REPO / "module_utils") not in ansible.module_utils.__path__:
        ansible.module_utils.__path__.append(str(REPO / "module_utils"))
    if str(REPO / "plugins" / "filter") not in sys.path:
        sys.path.insert(0, str(REPO / "plugins" / "filter"))


class _Module:
    """The little of AnsibleModule that OnlineDedup uses."""

    check_mode = False

    def __init__(self, params: dict):
        self.params = params
        self.warnings: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def _ledger(conn, backup_schema: str, run_id: str) -> None:
    import dedup as filters  # plugins/filter/dedup.py
    import jinja2
    from psycopg2 import sql

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO / "sql")))
    env.filters.update(filters.FilterModule().filters())
    text = env.get_template("ledger.sql.j2").render(dedup_backup_schema=backup_schema)
    with conn.cursor() as cur:
        cur.execute(text)
        cur.execute(sql.SQL("INSERT INTO {} (run_id, kind, status, mode) VALUES (%s, 'deploy', 'running', 'online') "
                            "ON CONFLICT (run_id) DO NOTHING").format(sql.Identifier(backup_schema, "runs")),
                    (run_id,))


def run_online(dsn: dict, schema: str, tables: list[dict], run_id: str = "bench-online", *,
               backup_schema: str = "dedup_rollout", backup_mode: str = "table", batch_rows: int = 10000,
               batch_pause: float = 0.1, vacuum_every: int = 50, lock_buckets: int = 1024,
               lock_timeout: str = "500ms", retries: int = 20, retry_delay: float = 1.0,
               work_mem: str = "256MB", maintenance_work_mem: str = "1GB", repack: str = "auto") -> dict:
    """Deduplicate and constrain every table online; returns the figures (see the module docstring)."""
    _import_paths()
    import psycopg2
    from ansible.module_utils.dedup_online import OnlineDedup
    from ansible.module_utils.dedup_plan import backup_table_name

    conn = psycopg2.connect(**dsn)
    conn.autocommit = True
    try:
        _ledger(conn, backup_schema, run_id)
    finally:
        conn.close()
    base = {"login_host": dsn.get("host", ""), "login_port": dsn.get("port"), "login_db": dsn.get("dbname"),
            "login_user": dsn.get("user"), "login_password": dsn.get("password"), "ssl_mode": "prefer",
            "connect_timeout": 10, "schema": schema, "run_id": run_id, "backup_schema": backup_schema,
            "backup_mode": backup_mode, "constraint_name": None, "nulls_not_distinct": False,
            "batch_rows": batch_rows, "batch_pause": batch_pause, "vacuum_every": vacuum_every,
            "lock_buckets": lock_buckets, "lock_timeout": lock_timeout, "retries": retries,
            "retry_delay": retry_delay, "work_mem": work_mem, "maintenance_work_mem": maintenance_work_mem,
            "repack": repack, "repack_wait_timeout": 10}
    out: dict = {"tables": {}}
    t0 = time.monotonic()
    for t in tables:
        params = dict(base, table=t["name"], natural_key=list(t["natural_key"]), keep=t.get("keep", "oldest"),
                      order_by=t.get("order_by"),
                      backup_table=backup_table_name(t["name"], run_id) if backup_mode == "table" else None)
        module = _Module(params)
        res = OnlineDedup(module).run(lambda p=params: psycopg2.connect(**dsn, application_name="bench-online"))
        res.pop("queries", None)
        res["warnings"] = module.warnings
        out["tables"][t["name"]] = res
    out["seconds"] = round(time.monotonic() - t0, 3)
    for key in ("rows_removed", "batches"):
        out[key] = sum(r.get(key, 0) for r in out["tables"].values())
    for key in ("longest_batch_seconds", "longest_lock_seconds"):
        out[key] = max((r.get(key, 0.0) for r in out["tables"].values()), default=0.0)
    return out
