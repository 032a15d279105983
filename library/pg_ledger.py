#!/usr/bin/python
"""The dedup-rollout ledger: which runs happened and what each did to each table."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_ledger
short_description: Record deploys, rollbacks and cleanups in the dedup-rollout ledger
description:
  - C(action=init) creates the owner-only ledger schema and tables from the rendered C(sql/ledger.sql.j2)
    (changed only when something was missing).
  - C(action=run) inserts or updates one run row (C(runs)); changed only when a value changes.
  - C(action=table) updates one table row of a run (C(table_runs)); changed only when a value changes.
  - C(action=read) returns runs and table rows (read-only).
  - Check mode writes nothing and reports what would change.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  action:
    description: What to do.
    type: str
    required: true
    choices: [init, run, table, read]
  backup_schema:
    description: Schema of the ledger.
    type: str
    default: dedup_rollout
  init_sql:
    description: Rendered sql/ledger.sql.j2 (action=init).
    type: str
  run_id:
    description: The run.
    type: str
  values:
    description:
      - Columns to set. For C(run) any column of C(runs) (kind, status, environment, mode, backup_mode, target_run_id,
        dump_path, dump_bytes, dump_sha256, dump_host, etl_release_before, etl_release_after, finished_at=now);
        C(details) is merged into the JSON. For C(table) columns of C(table_runs) (status, constraint_name,
        constraint_created, size_after).
    type: dict
    default: {}
  schema:
    description: Schema of the table (action=table).
    type: str
  table:
    description: Table name (action=table).
    type: str
"""

EXAMPLES = r"""
- name: Mark the deploy finished
  pg_ledger:
    action: run
    run_id: "{{ dedup_deploy_id }}"
    values: {status: succeeded, finished_at: now}
"""

RETURN = r"""
busy_sessions:
  description: Other dedup-rollout sessions still active in the database (pid, application, state, query).
  returned: when action=read
  type: list
runs:
  description: Run rows (action=read), newest first.
  returned: when action=read
  type: list
tables:
  description: Table rows of C(run_id) (action=read).
  returned: when action=read
  type: list
before:
  description: The run row (action=run) or table row (action=table) before the change, as JSON; null when new.
  returned: when action=run or action=table
  type: dict
after:
  description: The same row after the change (as it would be, in check mode).
  returned: when action=run or action=table
  type: dict
"""

import json
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    connect,
    error_text,
    pg_common_argument_spec,
    relation_exists,
    validate_identifier,
)

try:
    from psycopg2 import sql
except ImportError:  # pragma: no cover
    sql = None

RUN_COLUMNS = {"kind", "status", "environment", "mode", "backup_mode", "target_run_id", "dump_path", "dump_bytes",
               "dump_sha256", "dump_host", "etl_release_before", "etl_release_after", "finished_at", "details"}
TABLE_COLUMNS = {"status", "constraint_name", "constraint_created", "size_after", "finished_at", "natural_key", "keep",
                 "order_by", "size_before", "rows_before", "rows_kept", "rows_removed", "backup_mode", "backup_table"}


def ledger_exists(cur, schema):
    return relation_exists(cur, schema, "table_runs")


def _jsonable(row, cols):
    out = {}
    for c, v in zip(cols, row):
        out[c] = v.isoformat() if hasattr(v, "isoformat") else (float(v) if v.__class__.__name__ == "Decimal" else v)
    return out


def busy_sessions(cur):
    """Other dedup-rollout sessions still working in this database (e.g. the migration of a killed play)."""
    cur.execute(
        "SELECT pid, application_name, state, extract(epoch FROM now() - xact_start)::int, "
        "left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 120) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'dedup-rollout/%%' "
        "AND application_name NOT LIKE 'dedup-rollout/lock%%' AND state IS DISTINCT FROM 'idle' ORDER BY 1"
    )
    return [{"pid": r[0], "application": r[1], "state": r[2], "xact_seconds": r[3], "query": r[4]}
            for r in cur.fetchall()]


def do_read(cur, schema, run_id):
    busy = busy_sessions(cur)
    if not ledger_exists(cur, schema):
        return {"exists": False, "runs": [], "tables": [], "busy_sessions": busy}
    cur.execute(sql.SQL("SELECT * FROM {} ORDER BY started_at DESC").format(sql.Identifier(schema, "runs")))
    cols = [d[0] for d in cur.description]
    runs = [_jsonable(r, cols) for r in cur.fetchall()]
    tables = []
    if run_id:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE run_id = %s ORDER BY started_at NULLS LAST, table_name")
                    .format(sql.Identifier(schema, "table_runs")), (run_id,))
        cols = [d[0] for d in cur.description]
        tables = [_jsonable(r, cols) for r in cur.fetchall()]
    return {"exists": True, "runs": runs, "tables": tables, "busy_sessions": busy}


def _assignments(values, allowed, module):
    sets, params = [], []
    for col, val in sorted(values.items()):
        if col not in allowed:
            module.fail_json(msg="pg_ledger: unknown column %r (allowed: %s)" % (col, ", ".join(sorted(allowed))))
        if col == "finished_at":
            sets.append(sql.SQL("finished_at = clock_timestamp()") if val in ("now", True) else
                        sql.SQL("finished_at = %s"))
            if val not in ("now", True):
                params.append(val)
        elif col == "details":
            sets.append(sql.SQL("details = details || %s::jsonb"))
            params.append(json.dumps(val))
        else:
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(col)))
            params.append(val)
    return sets, params


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        action=dict(type="str", required=True, choices=["init", "run", "table", "read"]),
        backup_schema=dict(type="str", default="dedup_rollout"),
        init_sql=dict(type="str"),
        run_id=dict(type="str"),
        values=dict(type="dict", default={}),
        schema=dict(type="str"),
        table=dict(type="str"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("action", "init", ["init_sql"]), ("action", "run", ["run_id"]),
                                        ("action", "table", ["run_id", "schema", "table"])])
    p = module.params
    schema = validate_identifier(p["backup_schema"], "backup schema", module)
    try:
        conn = connect(module, autocommit=False)
        cur = conn.cursor()
        if p["action"] == "read":
            out = do_read(cur, schema, p["run_id"])
            conn.rollback()
            module.exit_json(changed=False, **out)
        exists = ledger_exists(cur, schema)
        if p["action"] == "init":
            if exists:
                module.exit_json(changed=False, msg="ledger present")
            if module.check_mode:
                module.exit_json(changed=True, msg="would create the ledger schema %s" % schema)
            cur.execute(p["init_sql"])
            conn.commit()
            module.exit_json(changed=True, msg="ledger schema %s created" % schema)
        if not exists:
            if module.check_mode:
                module.exit_json(changed=True, msg="would record %s in a new ledger" % p["run_id"])
            module.fail_json(msg="the ledger %s does not exist yet (run action=init first)" % schema)
        if p["action"] == "run":
            runs = sql.Identifier(schema, "runs")
            cur.execute(sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s").format(runs), (p["run_id"],))
            row = cur.fetchone()
            before = json.loads(row[0]) if row else None
            values = dict(p["values"])
            if before is None:
                if "kind" not in values or "status" not in values:
                    module.fail_json(msg="a new run needs values.kind and values.status")
                cur.execute(sql.SQL("INSERT INTO {} (run_id, kind, status) VALUES (%s, %s, %s)").format(runs),
                            (p["run_id"], values["kind"], values["status"]))
            sets, params = _assignments(values, RUN_COLUMNS, module)
            if sets:
                cur.execute(sql.SQL("UPDATE {} SET {} WHERE run_id = %s").format(runs, sql.SQL(", ").join(sets)),
                            params + [p["run_id"]])
            cur.execute(sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s").format(runs), (p["run_id"],))
            after = json.loads(cur.fetchone()[0])
        else:
            trs = sql.Identifier(schema, "table_runs")
            key = (p["run_id"], p["schema"], p["table"])
            cur.execute(sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s AND schema_name = %s "
                                "AND table_name = %s").format(trs), key)
            row = cur.fetchone()
            before = json.loads(row[0]) if row else None
            if row is None:
                vals = p["values"]
                if not vals.get("natural_key") or not vals.get("status"):
                    conn.rollback()
                    module.fail_json(msg="no ledger row for table %s.%s in run %s (give values.natural_key and "
                                         "values.status to create one)" % (p["schema"], p["table"], p["run_id"]))
                cur.execute(sql.SQL("INSERT INTO {} (run_id, schema_name, table_name, natural_key, keep, order_by, "
                                    "status, started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp())")
                            .format(trs), list(key) + [vals["natural_key"], vals.get("keep", "oldest"),
                                                       vals.get("order_by", ""), vals["status"]])
            sets, params = _assignments(p["values"], TABLE_COLUMNS, module)
            cur.execute(sql.SQL("UPDATE {} SET {} WHERE run_id = %s AND schema_name = %s AND table_name = %s")
                        .format(trs, sql.SQL(", ").join(sets)), params + list(key))
            cur.execute(sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s AND schema_name = %s "
                                "AND table_name = %s").format(trs), key)
            after = json.loads(cur.fetchone()[0])
        ignore = {"finished_at"}
        changed = before is None or any(before.get(k) != after.get(k) for k in after if k not in ignore)
        if module.check_mode or not changed:
            conn.rollback()
        else:
            conn.commit()
        module.exit_json(changed=changed, before=before, after=after)
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="ledger update failed: %s" % error_text(exc, module), exception=traceback.format_exc())


if __name__ == "__main__":
    main()
