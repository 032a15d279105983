#!/usr/bin/python
"""Ansible module pg_monitor: post-deploy monitoring facts and the monitoring checks in the ledger."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_monitor
short_description: Read the deploy to watch, measure sizes and record monitoring checks in the dedup-rollout ledger
description:
  - C(action=status) (read-only) returns the deploy to watch (the one given in C(run_id), else the latest
    deploy of the ledger), the last monitoring check of that deploy and the time used as "now"
    (C(now) when given, else the server's clock).
  - C(action=sizes) (read-only) returns the total size of each table, of the database and of the backup schema.
  - C(action=init) creates the owner-only C(monitor_checks) table from the rendered C(sql/monitor_checks.sql.j2);
    changed only when it was missing.
  - C(action=record) inserts one check into C(monitor_checks); always changed (a check is an event).
  - C(action=watch) is what the scheduled check's install needs, in one connection - C(action=init) when
    C(init_sql) is given (changed only when C(monitor_checks) was missing), then C(action=status), then the
    deploy's table rows of the ledger (C(tables)) with the constraint each got.
  - Check mode writes nothing.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  action:
    description: What to do.
    type: str
    required: true
    choices: [status, sizes, init, record, watch]
  backup_schema:
    description: Schema of the ledger.
    type: str
    default: dedup_rollout
  init_sql:
    description:
      - Rendered C(sql/monitor_checks.sql.j2) (action=init; action=watch creates the table when it is missing only
        if given).
    type: str
  run_id:
    description: The deploy (status, watch, record). For status and watch, empty means the latest deploy in the ledger.
    type: str
    default: ""
  now:
    description: ISO 8601 time used instead of the server's clock (status, watch, record); for tests and replays.
    type: str
    default: ""
  schema:
    description: Schema of the tables (action=sizes).
    type: str
    default: public
  tables:
    description: Table names (action=sizes).
    type: list
    elements: str
    default: []
  clean:
    description: Whether the check found nothing wrong (action=record).
    type: bool
    default: false
  source:
    description: Who checked (action=record).
    type: str
    default: playbook
    choices: [playbook, scheduled]
  environment:
    description: Environment name stored with the check.
    type: str
    default: ""
  inventory_host:
    description: Inventory host stored with the check.
    type: str
    default: ""
  duplicate_rows:
    description: Total duplicate rows found (action=record).
    type: int
    default: 0
  problems:
    description: One sentence per problem found (action=record).
    type: list
    elements: str
    default: []
  details:
    description: The full result, stored as JSON (action=record).
    type: dict
    default: {}
notes:
  - Needs psycopg2 on the target. Supports check mode.
"""

EXAMPLES = r"""
- name: Find the deploy to watch
  pg_monitor:
    action: status
  register: monitor__status

- name: Record a clean check
  pg_monitor:
    action: record
    run_id: "{{ monitor__status.deploy.run_id }}"
    clean: true
    problems: []

- name: Ensure the checks table, read the deploy, its age and the constraints it put in place (one connection)
  pg_monitor:
    action: watch
    init_sql: "{{ lookup('ansible.builtin.template', 'sql/monitor_checks.sql.j2') }}"
  register: monitor__sched_status
"""

RETURN = r"""
ledger_exists:
  description: Whether the ledger (runs, table_runs) exists (action=status, action=watch).
  returned: action=status, action=watch
  type: bool
checks_table:
  description:
    - Whether the table of monitoring checks (monitor_checks) exists (action=status, action=watch; after the
      creation, or, in check mode, as it would be).
  returned: action=status, action=watch
  type: bool
checks_table_created:
  description: Whether monitor_checks was created by this call (in check mode, would be).
  returned: action=watch
  type: bool
deploy:
  description:
    - The deploy's ledger row (run_id, status, environment, started_at, finished_at in ISO 8601 UTC, ...), or null.
  returned: action=status, action=watch
  type: dict
deploy_age_seconds:
  description: Seconds from the deploy's finish to now (null while it has not finished).
  returned: action=status, action=watch
  type: int
last_check:
  description: The newest monitoring check of that deploy (checked_at, source, clean, problems), or null.
  returned: action=status, action=watch
  type: dict
now:
  description: The time used as now, ISO 8601 UTC.
  returned: action=status, action=watch, action=record
  type: str
tables:
  description:
    - action=sizes, one entry per table (table, exists, bytes).
    - action=watch, the deploy's table rows in the ledger (schema_name, table_name, constraint_name), as
      pg_ledger action=read returns them; empty without a deploy.
  returned: action=sizes, action=watch
  type: list
database_size:
  description: pg_database_size of the database, bytes (action=sizes).
  returned: action=sizes
  type: int
backup_schema_bytes:
  description: Total size of the tables in the backup schema, bytes (action=sizes).
  returned: action=sizes
  type: int
check_id:
  description: The id of the recorded check (action=record, not in check mode).
  returned: action=record
  type: int
"""

import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import Ledger, jsonable
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    connect,
    error_text,
    pg_common_argument_spec,
    validate_identifier,
)
from ansible.module_utils.dedup_pg import utc_iso as iso

RUN_FIELDS = ("run_id", "kind", "status", "environment", "mode", "backup_mode", "target_run_id", "dump_path",
              "dump_bytes", "dump_host", "started_at", "finished_at", "details")
TABLE_FIELDS = ("schema_name", "table_name", "constraint_name")


def server_now(cur, now):
    cur.execute("SELECT coalesce(nullif(%s, '')::timestamptz, clock_timestamp())", (now or "",))
    return cur.fetchone()[0]


def do_status(cur, p, ledger):
    present = ledger.present(cur)
    out = {"ledger_exists": bool(present["runs"] and present["table_runs"]), "deploy": None, "last_check": None,
           "checks_table": bool(present["monitor_checks"]), "deploy_age_seconds": None}
    now = server_now(cur, p["now"])
    out["now"] = iso(now)
    if not out["ledger_exists"]:
        return out
    deploy = ledger.latest_deploy(cur, RUN_FIELDS, p["run_id"])
    if deploy is None:
        return out
    out["deploy"] = {k: iso(v) for k, v in deploy.items()}
    if deploy["finished_at"] is not None:
        out["deploy_age_seconds"] = int((now - deploy["finished_at"]).total_seconds())
    if out["checks_table"]:
        check = ledger.last_check(cur, deploy["run_id"])
        if check:
            out["last_check"] = dict(check, checked_at=iso(check["checked_at"]))
    return out


def do_watch(cur, conn, p, ledger, check_mode):
    """init (when init_sql is given and monitor_checks is missing), status and the deploy's table rows."""
    created = False
    if p["init_sql"] and not ledger.checks_exist(cur):
        created = True
        if not check_mode:
            ledger.create(cur, p["init_sql"])
            conn.commit()
    out = do_status(cur, p, ledger)
    if created and check_mode:
        out["checks_table"] = True
    out["checks_table_created"] = created
    out["tables"] = []
    if out["deploy"] is not None:
        rows = ledger.table_rows(cur, out["deploy"]["run_id"], columns=TABLE_FIELDS, order="started")
        out["tables"] = [{k: jsonable(v) for k, v in r.items()} for r in rows]
    conn.rollback()
    return created, out


def do_sizes(cur, p, schema, module):
    data_schema = validate_identifier(p["schema"], "schema", module)
    tables = []
    for name in p["tables"]:
        validate_identifier(name, "table", module)
        cur.execute("SELECT pg_total_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))",
                    (data_schema, name))
        size = cur.fetchone()[0]
        tables.append({"table": name, "schema": data_schema, "exists": size is not None,
                       "bytes": int(size) if size is not None else None})
    cur.execute("SELECT pg_database_size(current_database())")
    db_size = int(cur.fetchone()[0])
    cur.execute("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm')",
                (schema,))
    return {"tables": tables, "database_size": db_size, "backup_schema_bytes": int(cur.fetchone()[0])}


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        action=dict(type="str", required=True, choices=["status", "sizes", "init", "record", "watch"]),
        backup_schema=dict(type="str", default="dedup_rollout"),
        init_sql=dict(type="str"),
        run_id=dict(type="str", default=""),
        now=dict(type="str", default=""),
        schema=dict(type="str", default="public"),
        tables=dict(type="list", elements="str", default=[]),
        clean=dict(type="bool", default=False),
        source=dict(type="str", default="playbook", choices=["playbook", "scheduled"]),
        environment=dict(type="str", default=""),
        inventory_host=dict(type="str", default=""),
        duplicate_rows=dict(type="int", default=0),
        problems=dict(type="list", elements="str", default=[]),
        details=dict(type="dict", default={}),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("action", "init", ["init_sql"]), ("action", "record", ["run_id"])])
    p = module.params
    schema = validate_identifier(p["backup_schema"], "backup schema", module)
    try:
        conn = connect(module, autocommit=False)
        cur = conn.cursor()
        ledger = Ledger(schema)
        if p["action"] == "status":
            out = do_status(cur, p, ledger)
            conn.rollback()
            module.exit_json(changed=False, **out)
        if p["action"] == "watch":
            created, out = do_watch(cur, conn, p, ledger, module.check_mode)
            state = ("would be created" if module.check_mode else "created") if created else (
                "present" if out["checks_table"] else "absent")
            module.exit_json(changed=created, msg="%s.monitor_checks %s" % (schema, state), **out)
        if p["action"] == "sizes":
            out = do_sizes(cur, p, schema, module)
            conn.rollback()
            module.exit_json(changed=False, **out)
        if p["action"] == "init":
            if ledger.checks_exist(cur):
                module.exit_json(changed=False, msg="%s.monitor_checks present" % schema)
            if module.check_mode:
                module.exit_json(changed=True, msg="would create %s.monitor_checks" % schema)
            ledger.create(cur, p["init_sql"])
            conn.commit()
            module.exit_json(changed=True, msg="%s.monitor_checks created" % schema)
        # record
        now = server_now(cur, p["now"])
        if module.check_mode:
            conn.rollback()
            module.exit_json(changed=True, now=iso(now), msg="would record a %s check of %s"
                             % ("clean" if p["clean"] else "failed", p["run_id"]))
        if not ledger.checks_exist(cur):
            module.fail_json(msg="%s.monitor_checks does not exist (run action=init first)" % schema)
        check_id = ledger.record_check(cur, p["run_id"], now, p["source"], p["clean"], p["environment"] or None,
                                       p["inventory_host"] or None, p["duplicate_rows"], p["problems"], p["details"])
        conn.commit()
        module.exit_json(changed=True, check_id=check_id, now=iso(now))
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="pg_monitor %s failed: %s" % (p["action"], error_text(exc, module)),
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
