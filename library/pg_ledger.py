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
  - A thin module over C(module_utils/dedup_ledger.py), the one owner of the ledger's SQL and column lists.
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
    description:
      - Rendered sql/ledger.sql.j2. Required for C(action=init); with C(action=run) or C(action=table) the ledger is
        created from it first when it does not exist yet, in the same transaction (one call instead of two).
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

import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import Ledger, changed, jsonable
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    busy_sessions,
    connect,
    error_text,
    pg_common_argument_spec,
    validate_identifier,
)


def do_read(cur, ledger, run_id):
    busy = busy_sessions(cur)
    if not ledger.exists(cur):
        return {"exists": False, "runs": [], "tables": [], "busy_sessions": busy}
    runs = [{k: jsonable(v) for k, v in r.items()} for r in ledger.runs(cur)]
    tables = []
    if run_id:
        tables = [{k: jsonable(v) for k, v in r.items()} for r in ledger.table_rows(cur, run_id, order="started")]
    return {"exists": True, "runs": runs, "tables": tables, "busy_sessions": busy}


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
        ledger = Ledger(schema)
        conn = connect(module, autocommit=False)
        cur = conn.cursor()
        if p["action"] == "read":
            out = do_read(cur, ledger, p["run_id"])
            conn.rollback()
            module.exit_json(changed=False, **out)
        exists = ledger.exists(cur)
        if p["action"] == "init":
            if exists:
                module.exit_json(changed=False, msg="ledger present")
            if module.check_mode:
                module.exit_json(changed=True, msg="would create the ledger schema %s" % schema)
            ledger.create(cur, p["init_sql"])
            conn.commit()
            module.exit_json(changed=True, msg="ledger schema %s created" % schema)
        if not exists:
            if module.check_mode:
                module.exit_json(changed=True, msg="would record %s in a new ledger" % p["run_id"])
            if not p["init_sql"]:
                module.fail_json(msg="the ledger %s does not exist yet (run action=init first)" % schema)
            ledger.create(cur, p["init_sql"])
        if p["action"] == "run":
            before, after = ledger.put_run(cur, p["run_id"], p["values"])
        else:
            before, after = ledger.put_table(cur, p["run_id"], p["schema"], p["table"], p["values"])
        differs = changed(before, after) or not exists
        if module.check_mode or not differs:
            conn.rollback()
        else:
            conn.commit()
        module.exit_json(changed=differs, before=before, after=after)
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="ledger update failed: %s" % error_text(exc, module), exception=traceback.format_exc())


if __name__ == "__main__":
    main()
