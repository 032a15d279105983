#!/usr/bin/python
"""Where a running pg_migrate_table is: its step, for how long, what it waits for, index build progress."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_migrate_progress
short_description: Report the progress of a table migration that runs in the background
description:
  - Looks in C(pg_stat_activity) for the session of C(pg_migrate_table) working on C(schema.table) for C(run_id)
    (it sends every statement with a leading comment naming run, table, step and attempt), and reports its step,
    the seconds spent in the step and in the transaction, what it waits for (a lock, and the sessions holding
    it), and for index builds and C(VACUUM FULL) the server's own progress counters.
  - Waits up to C(wait) seconds first, returning early as soon as the migration's session is gone (finished,
    failed, or between two lock attempts). Reads only; never changes anything.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  run_id:
    description: The run id the migration was started with.
    type: str
    required: true
  schema:
    description: Schema of the table.
    type: str
    required: true
  table:
    description: The table.
    type: str
    required: true
  wait:
    description: Seconds to wait before reporting (early when the session is gone).
    type: float
    default: 10
"""

EXAMPLES = r"""
- name: Where is the migration of task_requirements
  pg_migrate_progress:
    login_db: breezeway
    run_id: "{{ preflight_deploy_id }}"
    schema: breezeway
    table: task_requirements
    wait: 10
"""

RETURN = r"""
running:
  description: Whether the migration's session was found busy with the table.
  returned: always
  type: bool
pid:
  description: Backend pid of the migration's session.
  returned: when running
  type: int
step:
  description: Name of the current step (see sql/migrate_table.sql.j2), C(retry_wait) between attempts.
  returned: when running
  type: str
step_number:
  description: Number of the step and the total (e.g. 4 and 12).
  returned: when running
  type: list
attempt:
  description: Attempt number (lock retries).
  returned: when running
  type: int
step_seconds:
  description: Seconds spent in the current statement.
  returned: when running
  type: float
transaction_seconds:
  description: Seconds since the transaction began.
  returned: when running
  type: float
waiting_for:
  description: The wait event (e.g. C(Lock/relation)) and the pids blocking it, if any.
  returned: when running
  type: dict
server_progress:
  description: Row of C(pg_stat_progress_create_index) or C(pg_stat_progress_cluster) for the session, if any.
  returned: when running
  type: dict
msg:
  description: One readable line.
  returned: always
  type: str
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_pg import connect, pg_common_argument_spec
from ansible.module_utils.dedup_plan import MARKER_PREFIX, STEP_TEXT, parse_marker

ACTIVITY = """
SELECT a.pid, a.state, a.query, a.wait_event_type, a.wait_event, pg_catalog.pg_blocking_pids(a.pid),
       round(extract(epoch FROM now() - a.query_start)::numeric, 1)::float8,
       round(extract(epoch FROM now() - a.xact_start)::numeric, 1)::float8
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_catalog.pg_backend_pid() AND left(a.query, %s) = %s
"""

SERVER_PROGRESS = (
    ("index build", "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
                    "FROM pg_catalog.pg_stat_progress_create_index WHERE pid = %s"),
    ("table rewrite", "SELECT phase, heap_blks_scanned AS blocks_done, heap_blks_total AS blocks_total, "
                      "heap_tuples_written AS tuples_done, NULL::bigint AS tuples_total "
                      "FROM pg_catalog.pg_stat_progress_cluster WHERE pid = %s"),
)


def find(cur, p):
    cur.execute(ACTIVITY, (len(MARKER_PREFIX), MARKER_PREFIX))
    for pid, state, query, wtype, wevent, blockers, step_s, xact_s in cur.fetchall():
        mark = parse_marker(query)
        if not mark or mark.get("run") != p["run_id"] or mark.get("schema") != p["schema"] \
                or mark.get("table") != p["table"]:
            continue
        if state != "active" and mark.get("step") != "retry_wait":
            if state == "idle":
                continue  # the last statement ran and the session left the transaction: not working on it now
        return {"pid": pid, "state": state, "mark": mark, "wait_event_type": wtype, "wait_event": wevent,
                "blockers": list(blockers or []), "step_seconds": step_s, "transaction_seconds": xact_s}
    return None


def server_progress(cur, pid):
    for kind, query in SERVER_PROGRESS:
        cur.execute(query, (pid,))
        row = cur.fetchone()
        if row:
            names = [d[0] for d in cur.description]
            out = dict(zip(names, row))
            out["kind"] = kind
            return out
    return {}


def describe(p, found, extra):
    mark = found["mark"]
    step = mark.get("step")
    where = "%s.%s" % (p["schema"], p["table"])
    if step == "retry_wait":
        return "%s: attempt %s hit a lock timeout; %s" % (where, mark.get("attempt"), STEP_TEXT["retry_wait"])
    line = "%s: step %s/%s '%s', %s: %.1f s in this step, %.1f s in the transaction (attempt %s)" % (
        where, mark.get("n"), mark.get("of"), step, STEP_TEXT.get(step, "?"), found["step_seconds"] or 0,
        found["transaction_seconds"] or 0, mark.get("attempt"))
    if found["wait_event_type"] == "Lock":
        line += "; waiting for a lock (%s) held by pid(s) %s" % (
            found["wait_event"], ", ".join(str(b) for b in found["blockers"]) or "?")
    if extra:
        done, total = extra.get("blocks_done"), extra.get("blocks_total")
        pct = " %.0f%%" % (100.0 * done / total) if done is not None and total else ""
        line += "; %s: %s%s" % (extra["kind"], extra.get("phase"), pct)
        if extra.get("tuples_done"):
            line += ", %s rows" % extra["tuples_done"]
    return line


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        run_id=dict(type="str", required=True),
        schema=dict(type="str", required=True),
        table=dict(type="str", required=True),
        wait=dict(type="float", default=10.0),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    conn = connect(module, autocommit=True, application_name="progress", readonly=True)
    deadline = time.monotonic() + max(0.0, p["wait"])
    found = None
    with conn.cursor() as cur:
        while True:
            found = find(cur, p)
            if found is None or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if found is None:
            conn.close()
            module.exit_json(changed=False, running=False,
                             msg="%s.%s: the migration's session is not working on it now" % (p["schema"], p["table"]))
        extra = server_progress(cur, found["pid"])
    conn.close()
    mark = found["mark"]
    module.exit_json(
        changed=False, running=True, pid=found["pid"], step=mark.get("step"),
        step_number=[mark.get("n"), mark.get("of")], attempt=mark.get("attempt"),
        step_seconds=found["step_seconds"], transaction_seconds=found["transaction_seconds"],
        waiting_for={"event": "%s/%s" % (found["wait_event_type"], found["wait_event"])
                     if found["wait_event_type"] else None, "blocking_pids": found["blockers"]},
        server_progress=extra, msg=describe(p, found, extra))


if __name__ == "__main__":
    main()
