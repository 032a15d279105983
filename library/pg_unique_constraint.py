#!/usr/bin/python
"""Ansible module pg_unique_constraint: ensure a UNIQUE constraint over a column set exists (or not)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_unique_constraint
short_description: Ensure a UNIQUE constraint over a column set is present or absent (idempotent by meaning)
description:
  - C(state=present) is idempotent by meaning, not by name. An existing valid UNIQUE constraint, or a
    valid unique index without predicate or expression, whose key column set equals C(columns) in any
    order (as C(ON CONFLICT) inference sees it) counts as present and nothing is added beside it.
  - When a key column is nullable and C(nulls_not_distinct=true) is asked, a constraint that treats NULLs as
    distinct is not equivalent (a new one is created). An existing C(NULLS NOT DISTINCT) one is stricter and
    satisfies a plain request; the result's C(nulls_not_distinct) reports the setting in effect.
  - Before any DDL it checks for duplicates (as the constraint would see them) and fails with their count
    and sample keys.
  - With C(concurrently), builds C(CREATE UNIQUE INDEX CONCURRENTLY) then
    C(ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX). An INVALID index of that name left by an
    interrupted build is detected, dropped and rebuilt; it never counts as present.
  - Each DDL attempt runs with C(lock_timeout); on a lock timeout (or a deadlock) it retries up to C(retries) times,
    then fails naming the sessions holding or waiting for locks on the table (the retry rules of
    C(module_utils/dedup_locks.py), shared with the other modules). Between two attempts it stops once the play
    that started it is gone.
  - C(state=absent) drops only the UNIQUE constraint called C(name), and only if it exists.
  - Check mode runs no DDL at all (catalog reads only) and reports the C(action) it would take.
    Supports C(--diff).
  - B(List mode) - C(constraints) lists the tables (each with the per-table options C(schema), C(table),
    C(columns), C(name), C(nulls_not_distinct)); the other options apply to every table. The tables are done in
    order, in one process and on one connection, each exactly as in single mode. A table that fails does not stop
    the others (as a loop of one call per table did); the call then fails with single mode's message of each
    failed table, C(failed_table), C(failed_tables) and the C(results) of all (a failed one with C(failed=true)).
    Between two tables it stops once the play that started it is gone, and after a lost connection.
  - In list mode an element's C(record) writes the table's row of the ledger run C(ledger_run_id) (in
    C(ledger_schema)) right after its constraint, when this run created it (or C(record_always)) - status
    C(constrained), C(constraint_name), C(natural_key), C(keep), C(order_by), and C(constraint_created=true) when
    created - through C(module_utils/dedup_ledger.py), as C(pg_ledger action=table) does. Check mode only reads
    the row.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg, dedup_pg.run_lock]
options:
  schema:
    description: Schema of the table (in list mode, of each element that gives none).
    type: str
    default: public
  table:
    description: The table (single mode; required unless C(constraints) is given).
    type: str
  columns:
    description:
      - The key columns (order is used for a new constraint; any order matches an existing one).
      - Single mode; required with C(table).
    type: list
    elements: str
  constraints:
    description:
      - List mode - one element per table, done in order. Mutually exclusive with C(table), C(columns) and C(name).
    type: list
    elements: dict
    suboptions:
      schema:
        description: Schema of the table (default the module's C(schema)).
        type: str
      table:
        description: The table.
        type: str
        required: true
      columns:
        description: The key columns (as C(columns) of single mode).
        type: list
        elements: str
        required: true
      name:
        description: Constraint name (as C(name) of single mode).
        type: str
      nulls_not_distinct:
        description: As C(nulls_not_distinct) of single mode (default the module's).
        type: bool
      record:
        description:
          - Record the table's constraint in the ledger run C(ledger_run_id) after it is ensured (C(state=present)
            only; nothing is recorded without C(ledger_run_id)).
        type: dict
        suboptions:
          natural_key:
            description: The natural key written to the ledger row (default C(columns)).
            type: list
            elements: str
          keep:
            description: Which duplicate was kept (the ledger row's C(keep)).
            type: str
          order_by:
            description: The order that decided it (the ledger row's C(order_by)).
            type: str
      record_always:
        description:
          - With C(record), write the ledger row even when the constraint existed already (otherwise only when
            this run created it).
        type: bool
        default: false
  ledger_run_id:
    description: The ledger run whose table rows C(record) writes (list mode; empty = record nothing).
    type: str
    default: ""
  ledger_schema:
    description: Schema of the ledger (the backup schema, C(dedup_backup_schema)).
    type: str
    default: dedup_rollout
  state:
    description: Whether the constraint should exist.
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - Constraint name. Default C(<table>_<col1>_<col2>_key), shortened to 63 bytes with a hash suffix.
      - Required for C(state=absent). Single mode (list mode - each element's C(name)).
    type: str
  nulls_not_distinct:
    description:
      - Create the constraint C(NULLS NOT DISTINCT) (PostgreSQL 15+; fails clearly on older servers).
      - In list mode, the default of the elements.
    type: bool
    default: false
  concurrently:
    description: Build the index with C(CREATE UNIQUE INDEX CONCURRENTLY), then attach it as the constraint.
    type: bool
    default: false
  lock_timeout:
    description: C(lock_timeout) for each DDL attempt (PostgreSQL interval text, e.g. C(5s)).
    type: str
    default: 5s
  retries:
    description: Extra attempts after a lock timeout.
    type: int
    default: 5
  retry_delay:
    description: Seconds between attempts.
    type: float
    default: 2
  statement_timeout:
    description: C(statement_timeout) for each DDL statement (C(0) = none). A statement timeout is not retried.
    type: str
    default: "0"
notes:
  - Needs psycopg2 on the target. Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: Ensure task_requirements has a UNIQUE constraint on its natural key
  pg_unique_constraint:
    login_host: "{{ dedup_db_host }}"
    login_db: "{{ dedup_db_name }}"
    login_user: "{{ dedup_db_user }}"
    login_password: "{{ dedup_db_password }}"
    schema: breezeway
    table: task_requirements
    columns: [task_pk, requirement_id]
    concurrently: true
    lock_timeout: 5s
    retries: 5
  no_log: true

- name: Remove the constraint again (rollback)
  pg_unique_constraint:
    login_db: breezeway
    schema: breezeway
    table: task_requirements
    columns: [task_pk, requirement_id]
    name: task_requirements_task_pk_requirement_id_key
    state: absent

- name: Every table at once, each recorded in the ledger (one module call; the migrate role does this)
  pg_unique_constraint:
    login_db: breezeway
    constraints:
      - schema: breezeway
        table: task_requirements
        columns: [task_pk, requirement_id]
        record: {keep: oldest, order_by: id}
        record_always: true
      - schema: breezeway
        table: task_tags
        columns: [task_pk, tag_pk]
        record: {keep: oldest, order_by: id}
    ledger_run_id: "{{ preflight_deploy_id }}"
    ledger_schema: dedup_rollout
    lock_timeout: 5s
  register: constraints
"""

RETURN = r"""
name:
  description: The constraint (or equivalent index) name in effect.
  returned: single mode
  type: str
action:
  description: What was done (or would be done in check mode).
  returned: single mode
  type: str
  sample: created
  choices: [created, created_concurrently, attached_index, rebuilt_invalid_index, dropped, none]
existing:
  description: The equivalent constraint/index found before the run (name, type, definition, valid), or null.
  returned: single mode
  type: dict
queries:
  description: The SQL statements executed (empty in check mode); in list mode on failure, those of the failed table.
  returned: single mode, and on failure
  type: list
  elements: str
nulls_not_distinct:
  description: The NULLS NOT DISTINCT setting of the constraint in effect (or requested).
  returned: single mode
  type: bool
nullable_columns:
  description: Key columns without NOT NULL.
  returned: single mode, when state=present
  type: list
  elements: str
duplicates:
  description: Duplicate rows/groups found before DDL (state=present).
  returned: single mode, when state=present and no equivalent exists (also on the failure it causes)
  type: dict
schema:
  description: Schema of the table.
  returned: single mode, when state=present
  type: str
table:
  description: The table.
  returned: single mode, when state=present
  type: str
columns:
  description: The key columns asked for.
  returned: single mode, when state=present
  type: list
  elements: str
definition:
  description: The constraint's definition (C(pg_get_constraintdef)) once created.
  returned: single mode, when a constraint was created (not in check mode)
  type: str
results:
  description:
    - List mode - one dict per table done, in order, with the keys single mode returns (C(name), C(changed),
      C(action), C(existing), C(queries), C(nulls_not_distinct), C(nullable_columns), C(duplicates), C(columns),
      C(definition), C(diff) as they apply) plus C(schema), C(table) and, when recorded, C(ledger).
    - On failure, the tables done before the one that failed.
  returned: list mode
  type: list
  elements: dict
  contains:
    schema:
      description: Schema of the table.
      returned: always
      type: str
    table:
      description: The table.
      returned: always
      type: str
    name:
      description: The constraint (or equivalent index) name in effect.
      returned: always
      type: str
    changed:
      description: Whether the constraint was created, attached, rebuilt or dropped (would be, in check mode).
      returned: always
      type: bool
    action:
      description: What was done, as C(action) of single mode.
      returned: always
      type: str
    ledger:
      description:
        - The ledger row written (C(record)) - C(changed), C(before) and C(after) (as JSON; C(after) as it would
          be in check mode). C(changed) of the module is also true when a row changed.
      returned: when recorded
      type: dict
failed_table:
  description: List mode - the first table that failed, as C("schema"."table").
  returned: failure in list mode
  type: str
failed_tables:
  description: List mode - every table that failed, as C("schema"."table").
  returned: failure in list mode, after the tables ran
  type: list
  elements: str
blocking:
  description:
    - When the locks could not be had, the sessions holding or waiting for locks on the table (pid, user,
      application, state, mode, granted, holds, waiting_for, query_start, xact_start, xact_seconds, wait_event,
      query, description).
  returned: failure to lock
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_constraint import Failed, UniqueConstraint, ensure_table
from ansible.module_utils.dedup_ledger import Ledger
from ansible.module_utils.dedup_locks import PlayWatch, play_gone
from ansible.module_utils.dedup_pg import DedupPgError, connect, pg_common_argument_spec

# The per-table options: of the module in single mode, of each element of ``constraints`` in list mode.
TABLE_OPTIONS = ("schema", "table", "columns", "name", "nulls_not_distinct")


def table_spec(params, element=None):
    """TABLE_OPTIONS of one table: the module's own (single mode) or a ``constraints`` element, whose schema and
    nulls_not_distinct default to the module's."""
    if element is None:
        return {k: params[k] for k in TABLE_OPTIONS}
    spec = {k: element.get(k) for k in TABLE_OPTIONS}
    if spec["schema"] is None:
        spec["schema"] = params["schema"]
    if spec["nulls_not_distinct"] is None:
        spec["nulls_not_distinct"] = params["nulls_not_distinct"]
    spec["record"] = element.get("record")
    spec["record_always"] = bool(element.get("record_always"))
    return spec


def where_of(spec):
    return '"%s"."%s"' % (spec.get("schema"), spec.get("table"))


def run_list(module, specs):
    """List mode: the tables in order on one connection. A table that fails does not stop the others (as a loop of
    one call per table did), unless the play is gone or the connection is lost; the call then fails with the single
    mode's message of every table that failed and the results of all."""
    p = module.params
    ledger = None
    if p["ledger_run_id"] and any(s["record"] is not None for s in specs):
        try:
            ledger = Ledger(p["ledger_schema"])
        except DedupPgError as exc:
            module.fail_json(msg=str(exc), results=[])
    watch = PlayWatch(p.get("run_lock_id") or None, every=0)
    conn = connect(module, autocommit=True, application_name="pg_unique_constraint")
    results, version, failures = [], None, []
    try:
        for number, spec in enumerate(specs):
            if number and play_gone(conn, watch):
                failures.append(("the play that started pg_unique_constraint is gone; stopped before %s (%d of %d "
                                 "tables done)" % (where_of(spec), number, len(specs)), spec, {"queries": []}))
                break
            try:
                result, version = ensure_table(module, conn, spec, watch, version=version, ledger=ledger,
                                               run_id=p["ledger_run_id"])
            except Failed as exc:
                msg = exc.msg
                if spec["table"] not in msg:  # a few messages do not name the table: say which it is
                    msg = "%s: %s" % (where_of(spec), msg)
                failures.append((msg, spec, exc.extra))
                results.append(dict(exc.extra, schema=spec["schema"], table=spec["table"], changed=False,
                                    failed=True, msg=msg))
                if conn.closed:  # the connection is gone: the other tables cannot be done on it
                    break
                continue
            result.setdefault("schema", spec["schema"])
            result.setdefault("table", spec["table"])
            results.append(result)
    finally:
        conn.close()
    if failures:
        module.fail_json(msg="; ".join(m for m, _s, _x in failures), results=results,
                         failed_table=where_of(failures[0][1]),
                         failed_tables=[where_of(spec) for _m, spec, _x in failures], **failures[0][2])
    out = dict(changed=any(r["changed"] or (r.get("ledger") or {}).get("changed") for r in results),
               results=results)
    diffs = [r["diff"] for r in results if r.get("diff")]
    if module._diff and diffs:
        out["diff"] = diffs
    return out


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        schema=dict(type="str", default="public"),
        table=dict(type="str"),
        columns=dict(type="list", elements="str"),
        constraints=dict(type="list", elements="dict", options=dict(
            schema=dict(type="str"),
            table=dict(type="str", required=True),
            columns=dict(type="list", elements="str", required=True),
            name=dict(type="str"),
            nulls_not_distinct=dict(type="bool"),
            record=dict(type="dict", options=dict(
                natural_key=dict(type="list", elements="str", no_log=False),
                keep=dict(type="str"),
                order_by=dict(type="str"),
            )),
            record_always=dict(type="bool", default=False),
        )),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        name=dict(type="str"),
        nulls_not_distinct=dict(type="bool", default=False),
        concurrently=dict(type="bool", default=False),
        lock_timeout=dict(type="str", default="5s"),
        retries=dict(type="int", default=5),
        retry_delay=dict(type="float", default=2),
        statement_timeout=dict(type="str", default="0"),
        run_lock_id=dict(type="str", default=""),
        ledger_run_id=dict(type="str", default=""),
        ledger_schema=dict(type="str", default="dedup_rollout"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           mutually_exclusive=[("constraints", "table"), ("constraints", "columns"),
                                               ("constraints", "name")],
                           required_one_of=[("constraints", "table")],
                           required_together=[("table", "columns")])
    p = module.params
    if p["constraints"] is None:  # single mode: one table, as always
        spec = table_spec(p)
        try:
            UniqueConstraint(module, spec)  # names are checked before connecting
        except Failed as exc:
            module.fail_json(msg=exc.msg, **exc.extra)
        conn = connect(module, autocommit=True, application_name="pg_unique_constraint")
        try:
            result = ensure_table(module, conn, spec, PlayWatch(p.get("run_lock_id") or None, every=0))[0]
        except Failed as exc:
            module.fail_json(msg=exc.msg, **exc.extra)
        finally:
            conn.close()
        module.exit_json(**result)
    specs = [table_spec(p, element) for element in p["constraints"]]
    for spec in specs:  # every name is checked before anything runs
        try:
            UniqueConstraint(module, spec)
        except Failed as exc:
            module.fail_json(msg="%s: %s" % (where_of(spec), exc.msg), results=[], failed_table=where_of(spec))
        if spec["record"] is not None and p["state"] == "absent":
            module.fail_json(msg="%s: record is for state=present only" % where_of(spec), results=[],
                             failed_table=where_of(spec))
    module.exit_json(**run_list(module, specs))


if __name__ == "__main__":
    main()
