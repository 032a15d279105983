#!/usr/bin/python
"""Ansible module pg_backup_cleanup: decide whether a deploy's backup tables may go, and drop them."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_backup_cleanup
short_description: Plan and perform the removal of a deploy's backup tables (dedup-rollout ledger)
description:
  - C(state=planned) only reads. It picks the deploy (C(run_id), else the latest deploy in the ledger), lists
    the backup tables its ledger rows name (with their sizes, whether they still exist) and its dump, and says
    why the backups may not be removed yet (C(refusals)) - the deploy is unfinished or failed, a rollback of it
    is running or failed, the retention has not passed, or the last monitoring check is missing, too old or
    not clean. C(force=true) turns the refusals into C(forced) and allows the removal.
  - C(state=absent) drops the backup tables named in C(tables), each of which must be a backup table the
    ledger records for that deploy (nothing else is ever dropped), in one transaction with C(lock_timeout),
    and returns the bytes given back and the database size before and after. It re-checks the refusals
    and fails unless they are empty or C(force) is set.
  - Check mode drops nothing and reports what would be dropped.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  state:
    description: planned (read-only) or absent (drop).
    type: str
    default: planned
    choices: [planned, absent]
  backup_schema:
    description: Schema of the ledger and the backup tables.
    type: str
    default: dedup_rollout
  run_id:
    description: The deploy whose backups go. Empty means the latest deploy recorded in the ledger.
    type: str
    default: ""
  now:
    description: ISO 8601 time used instead of the server's clock (tests, replays).
    type: str
    default: ""
  retention_days:
    description: Days after the deploy (or its rollback) finished during which the backups are kept.
    type: float
    default: 7
  check_max_age_hours:
    description: The last monitoring check must be at most this old (0 = any age).
    type: float
    default: 48
  force:
    description:
      - Remove the backups even though a refusal applies (retention, monitoring, a rollback that may need them).
    type: bool
    default: false
  tables:
    description: Backup tables to drop (state=absent); each must be recorded for C(run_id) in the ledger.
    type: list
    elements: str
    default: []
  lock_timeout:
    description: lock_timeout for the DROP TABLE statements.
    type: str
    default: 10s
notes:
  - Needs psycopg2 on the target. Supports check mode.
"""

EXAMPLES = r"""
- name: Plan the cleanup of the latest deploy
  pg_backup_cleanup:
    state: planned
    retention_days: 7
  register: cleanup__plan

- name: Drop its backup tables
  pg_backup_cleanup:
    state: absent
    run_id: "{{ cleanup__plan.deploy.run_id }}"
    tables: "{{ cleanup__plan.backup_tables | selectattr('exists') | map(attribute='backup_table') | list }}"
"""

RETURN = r"""
deploy:
  description: The deploy's ledger row (run_id, status, finished_at, dump_path, dump_host, dump_bytes, ...), or null.
  returned: always
  type: dict
backup_tables:
  description: One entry per ledger row with a backup table (table, schema, natural_key, backup_table, exists, bytes).
  returned: always
  type: list
backup_bytes:
  description: Total size of the backup tables that still exist.
  returned: always
  type: int
refusals:
  description: Why the backups may not go yet (empty = they may).
  returned: always
  type: list
forced:
  description: The refusals overridden by force.
  returned: always
  type: list
allowed:
  description: Whether the removal may go ahead (no refusal, or forced).
  returned: always
  type: bool
retention_ends:
  description: When the retention ends (ISO 8601 UTC), or null when the deploy never finished.
  returned: always
  type: str
now:
  description: The time used as now (ISO 8601 UTC).
  returned: always
  type: str
last_check:
  description: The newest monitoring check of the deploy, or null.
  returned: always
  type: dict
cleanups:
  description: Earlier cleanup runs of this deploy (run_id, status, finished_at).
  returned: always
  type: list
dropped:
  description: The tables dropped (or that would be, in check mode), each with its bytes (state=absent).
  returned: state=absent
  type: list
bytes_freed:
  description: Bytes of the dropped tables (state=absent).
  returned: state=absent
  type: int
database_size_before:
  description: pg_database_size before the drop (state=absent).
  returned: state=absent
  type: int
database_size_after:
  description: pg_database_size after the drop (state=absent; the estimate in check mode).
  returned: state=absent
  type: int
"""

import datetime
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import Ledger
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    connect,
    error_text,
    pg_common_argument_spec,
    validate_identifier,
)
from ansible.module_utils.dedup_pg import utc_iso as iso

try:
    from psycopg2 import sql
except ImportError:  # pragma: no cover
    sql = None

RUN_FIELDS = ("run_id", "kind", "status", "environment", "backup_mode", "target_run_id", "dump_path", "dump_bytes",
              "dump_host", "started_at", "finished_at")


BACKUP_FIELDS = ("schema_name", "table_name", "natural_key", "keep", "order_by", "backup_table", "backup_mode")


def plan(cur, p, schema):
    """Everything the cleanup needs to know; raw datetimes are kept in private keys (``_``)."""
    cur.execute("SELECT coalesce(nullif(%s, '')::timestamptz, clock_timestamp())", (p["now"] or "",))
    now = cur.fetchone()[0]
    out = {"deploy": None, "backup_tables": [], "backup_bytes": 0, "refusals": [], "forced": [], "allowed": False,
           "retention_ends": None, "now": iso(now), "last_check": None, "cleanups": []}
    ledger = Ledger(schema)
    if not ledger.exists(cur):
        out["refusals"].append("there is no dedup-rollout ledger (%s.runs) in this database: nothing to clean" % schema)
        return out
    deploy = ledger.latest_deploy(cur, RUN_FIELDS, p["run_id"])
    if deploy is None:
        out["refusals"].append("no deploy %s in the ledger: nothing to clean"
                               % (p["run_id"] if p["run_id"] else "at all"))
        return out
    run_id = deploy["run_id"]
    out["deploy"] = {k: iso(v) for k, v in deploy.items()}

    for row in ledger.table_rows(cur, run_id, BACKUP_FIELDS, with_backup_table=True):
        cur.execute("SELECT pg_total_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))",
                    (schema, row["backup_table"]))
        size = cur.fetchone()[0]
        out["backup_tables"].append({"schema": row["schema_name"], "table": row["table_name"],
                                     "natural_key": list(row["natural_key"]), "keep": row["keep"],
                                     "order_by": row["order_by"], "backup_table": row["backup_table"],
                                     "backup_mode": row["backup_mode"], "exists": size is not None,
                                     "bytes": int(size) if size is not None else 0})
    out["backup_bytes"] = sum(b["bytes"] for b in out["backup_tables"] if b["exists"])

    others = ledger.runs(cur, RUN_FIELDS, target_run_id=run_id)
    rollbacks = [r for r in others if r["kind"] == "rollback"]
    out["cleanups"] = [{"run_id": r["run_id"], "status": r["status"], "finished_at": iso(r["finished_at"])}
                       for r in others if r["kind"] == "cleanup"]

    refusals = out["refusals"]
    if deploy["status"] in ("running", "failed"):
        refusals.append("deploy %s is %s: it may still have to be rolled back, and rollback.yml needs these "
                        "backups (finish or roll back the deploy first)" % (run_id, deploy["status"]))
    for r in rollbacks:
        if r["status"] in ("running", "failed"):
            refusals.append("rollback %s of deploy %s is %s: it needs these backups to finish"
                            % (r["run_id"], run_id, r["status"]))
    reference = deploy["finished_at"]
    if deploy["status"] == "rolled_back":
        done = [r["finished_at"] for r in rollbacks if r["status"] == "succeeded" and r["finished_at"]]
        reference = max(done + ([reference] if reference else [])) if done or reference else None
    if reference is None:
        if deploy["status"] not in ("running", "failed"):
            refusals.append("deploy %s has no finish time in the ledger: the retention cannot be computed" % run_id)
    else:
        ends = reference + datetime.timedelta(days=p["retention_days"])
        out["retention_ends"] = iso(ends)
        if now < ends:
            refusals.append("the retention of %g days has not passed: deploy %s finished at %s, its backups are "
                            "kept until %s (now %s)" % (p["retention_days"], run_id, iso(reference), iso(ends),
                                                        iso(now)))
    if deploy["status"] == "succeeded":
        check = ledger.last_check(cur, run_id) if ledger.checks_exist(cur) else None
        if check is None:
            refusals.append("no monitoring check of deploy %s is recorded: run playbooks/monitor.yml first, so "
                            "the backups go only once the tables are known to be clean" % run_id)
        else:
            checked_at, source, clean, problems = (check["checked_at"], check["source"], check["clean"],
                                                   check["problems"])
            out["last_check"] = {"checked_at": iso(checked_at), "source": source, "clean": clean,
                                 "problems": list(problems or [])}
            if not clean:
                refusals.append("the last monitoring check (%s, %s) was not clean: %s. A rollback may be needed; "
                                "keep the backups" % (iso(checked_at), source, "; ".join(problems or []) or "?"))
            elif p["check_max_age_hours"] > 0 and now - checked_at > datetime.timedelta(
                    hours=p["check_max_age_hours"]):
                refusals.append("the last monitoring check (%s) is older than %g hours: run playbooks/monitor.yml "
                                "again first" % (iso(checked_at), p["check_max_age_hours"]))
    if p["force"] and refusals:
        out["forced"] = list(refusals)
    out["allowed"] = not refusals or p["force"]
    return out


def drop(module, conn, cur, p, schema, planned):
    known = {b["backup_table"]: b for b in planned["backup_tables"]}
    unknown = [t for t in p["tables"] if t not in known]
    if unknown:
        module.fail_json(msg="refusing to drop %s: not a backup table that the ledger records for deploy %s "
                             "(known: %s)" % (", ".join(unknown), planned["deploy"]["run_id"],
                                              ", ".join(sorted(known)) or "none"), **planned)
    todo = [known[t] for t in p["tables"] if known[t]["exists"]]
    cur.execute("SELECT pg_database_size(current_database())")
    before = int(cur.fetchone()[0])
    dropped = [{"backup_table": b["backup_table"], "table": b["table"], "schema": b["schema"],
                "natural_key": b["natural_key"], "keep": b["keep"], "order_by": b["order_by"],
                "backup_mode": b["backup_mode"], "bytes": b["bytes"]} for b in todo]
    freed = sum(b["bytes"] for b in todo)
    result = dict(planned, dropped=dropped, bytes_freed=freed, database_size_before=before)
    if not todo or module.check_mode:
        conn.rollback()
        result["database_size_after"] = before - (freed if module.check_mode else 0)
        module.exit_json(changed=bool(todo), **result)
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (p["lock_timeout"],))
    for b in todo:
        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, b["backup_table"])))
    conn.commit()
    cur.execute("SELECT pg_database_size(current_database())")
    result["database_size_after"] = int(cur.fetchone()[0])
    conn.rollback()
    module.exit_json(changed=True, **result)


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        state=dict(type="str", default="planned", choices=["planned", "absent"]),
        backup_schema=dict(type="str", default="dedup_rollout"),
        run_id=dict(type="str", default=""),
        now=dict(type="str", default=""),
        retention_days=dict(type="float", default=7),
        check_max_age_hours=dict(type="float", default=48),
        force=dict(type="bool", default=False),
        tables=dict(type="list", elements="str", default=[]),
        lock_timeout=dict(type="str", default="10s"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("state", "absent", ["run_id"])])
    p = module.params
    schema = validate_identifier(p["backup_schema"], "backup schema", module)
    for t in p["tables"]:
        validate_identifier(t, "backup table", module)
    try:
        conn = connect(module, autocommit=False)
        cur = conn.cursor()
        planned = plan(cur, p, schema)
        if p["state"] == "planned":
            conn.rollback()
            module.exit_json(changed=False, **planned)
        if planned["deploy"] is None:
            conn.rollback()
            module.fail_json(msg="; ".join(planned["refusals"]), **planned)
        if not planned["allowed"]:
            conn.rollback()
            module.fail_json(msg="refusing to drop the backups of deploy %s: %s. Set force to override."
                                 % (planned["deploy"]["run_id"], "; ".join(planned["refusals"])), **planned)
        drop(module, conn, cur, p, schema, planned)
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="pg_backup_cleanup failed: %s" % error_text(exc, module),
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
