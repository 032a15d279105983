#!/usr/bin/python
"""Deduplicate one table and add its UNIQUE constraint while writers keep running (online mode)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_online_dedup
short_description: Deduplicate a table and constrain it without blocking its writers (online mode)
description:
  - Installs a guard trigger that keeps new duplicates out (an INSERT whose natural key exists is skipped,
    as C(ON CONFLICT DO NOTHING) does; an UPDATE onto an existing key raises unique_violation), new keys
    serialised by C(pg_advisory_xact_lock) on C(lock_buckets) hash buckets.
  - Builds the keep-set from a snapshot, then deletes the other rows of every duplicated key in
    transactions of at most C(batch_rows) rows, each copying its rows into the backup table and counting
    them in the ledger in the same transaction, with C(batch_pause) seconds between batches.
  - Builds the unique index C(CONCURRENTLY), then attaches it with C(ADD CONSTRAINT ... UNIQUE USING INDEX)
    and drops the guard in one transaction under C(lock_timeout), retried.
  - Gives space back with plain C(VACUUM) (every C(vacuum_every) batches and at the end) and with
    C(pg_repack) when the extension and its client are present; otherwise reports the remaining bloat.
  - Resumable, every step finds its own leftovers (backup table, helper index, guard, invalid index).
  - Check mode changes nothing and says what would be done.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg, dedup_pg.run_lock]
options:
  schema: {description: Schema of the table., type: str, required: true}
  table: {description: The table., type: str, required: true}
  natural_key: {description: Natural-key columns., type: list, elements: str, required: true}
  keep: {description: Which row of a key to keep., type: str, default: oldest, choices: [oldest, newest]}
  order_by: {description: Column deciding oldest/newest (default the primary key)., type: str}
  run_id: {description: The deploy's run id (ledger row)., type: str, required: true}
  backup_schema: {description: Schema of the ledger and the backup tables., type: str, default: dedup_rollout}
  backup_table: {description: Backup table name (backup_mode=table)., type: str}
  backup_mode:
    description: C(table) copies every removed row into C(backup_table); C(dump) relies on the verified dump.
    type: str
    default: table
    choices: [table, dump]
  constraint_name: {description: Name of the constraint (default the one pg_unique_constraint gives)., type: str}
  nulls_not_distinct: {description: Build the index NULLS NOT DISTINCT (PostgreSQL 15+)., type: bool, default: false}
  batch_rows: {description: Most rows looked at (and removed) per transaction., type: int, default: 10000}
  batch_pause: {description: Seconds between batches (lets replicas keep up)., type: float, default: 0.1}
  vacuum_every: {description: Plain VACUUM every N batches (0 = only at the end)., type: int, default: 50}
  lock_buckets: {description: Advisory-lock buckets of the guard., type: int, default: 1024}
  lock_timeout: {description: lock_timeout of the short DDL transactions and batches., type: str, default: 500ms}
  retries: {description: Attempts after a lock timeout., type: int, default: 20}
  retry_delay: {description: Seconds between attempts., type: float, default: 1}
  work_mem: {description: work_mem for the keep-set and batches., type: str, default: 256MB}
  maintenance_work_mem: {description: maintenance_work_mem for the index builds., type: str, default: 1GB}
  repack:
    description: C(auto) runs pg_repack when the server has the extension and the client is installed.
    type: str
    default: auto
    choices: [auto, never]
  repack_wait_timeout:
    description: pg_repack C(--wait-timeout) in seconds (it gives up rather than kill sessions).
    type: int
    default: 10
notes:
  - Writers must use READ COMMITTED (the default) for the guard to see concurrent new keys; a duplicate that
    still gets in makes the unique index build fail, and the module deduplicates once more.
  - Needs a single-column primary key (the batches walk it); use offline mode otherwise.
"""

EXAMPLES = r"""
- name: Deduplicate task_requirements while the ETL runs
  pg_online_dedup:
    login_db: breezeway
    schema: breezeway
    table: task_requirements
    natural_key: [task_pk, requirement_id]
    run_id: "20261125T210000Z"
    backup_table: task_requirements__20261125T210000Z
    batch_rows: 10000
    batch_pause: 0.1
"""

RETURN = r"""
action:
  description: deduplicated_online, cleanup (leftovers of an interrupted run removed), none, would_deduplicate_online.
  returned: always
  type: str
constraint_name:
  description: The UNIQUE constraint in effect.
  returned: always
  type: str
rows_removed:
  description: Rows removed by this call (the ledger has the total over resumed calls).
  returned: always
  type: int
batches:
  description: Batches run.
  returned: always
  type: int
longest_batch_seconds:
  description: Longest batch transaction.
  returned: always
  type: float
longest_lock_seconds:
  description: Longest short DDL transaction (guard install, attach), lock waits included.
  returned: always
  type: float
size_before:
  description: total_bytes, heap_bytes, live_rows_estimate, heap_bloat_bytes_estimate before.
  returned: when work was done
  type: dict
size_after:
  description: The same after (bloat left when pg_repack was not available).
  returned: when work was done
  type: dict
repacked:
  description: Whether pg_repack rewrote the table.
  returned: always
  type: bool
repack_skipped:
  description: Why pg_repack was not used (no extension, no client of the extension's version, or C(repack=never)).
  returned: when pg_repack was not used
  type: str
steps:
  description: Step name, seconds and counts.
  returned: always
  type: list
queries:
  description: Every distinct statement executed (each batch statement once).
  returned: always
  type: list
"""

import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_online import OnlineDedup
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    connect,
    error_text,
    pg_common_argument_spec,
    validate_identifier,
)


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        schema=dict(type="str", required=True),
        table=dict(type="str", required=True),
        natural_key=dict(type="list", elements="str", required=True, no_log=False),
        keep=dict(type="str", default="oldest", choices=["oldest", "newest"]),
        order_by=dict(type="str"),
        run_id=dict(type="str", required=True),
        backup_schema=dict(type="str", default="dedup_rollout"),
        backup_table=dict(type="str"),
        backup_mode=dict(type="str", default="table", choices=["table", "dump"]),
        constraint_name=dict(type="str"),
        nulls_not_distinct=dict(type="bool", default=False),
        batch_rows=dict(type="int", default=10000),
        batch_pause=dict(type="float", default=0.1),
        vacuum_every=dict(type="int", default=50),
        lock_buckets=dict(type="int", default=1024),
        lock_timeout=dict(type="str", default="500ms"),
        retries=dict(type="int", default=20),
        retry_delay=dict(type="float", default=1.0),
        work_mem=dict(type="str", default="256MB"),
        maintenance_work_mem=dict(type="str", default="1GB"),
        repack=dict(type="str", default="auto", choices=["auto", "never"]),
        repack_wait_timeout=dict(type="int", default=10),
        run_lock_id=dict(type="str", default=""),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[("backup_mode", "table", ["backup_table"])])
    p = module.params
    if p["backup_mode"] == "dump":
        p["backup_table"] = None
    if not p["natural_key"]:
        module.fail_json(msg="natural_key must list at least one column")
    if p["batch_rows"] < 1 or p["lock_buckets"] < 1 or p["batch_pause"] < 0:
        module.fail_json(msg="batch_rows and lock_buckets must be positive, batch_pause not negative")
    for name, what in [(p["schema"], "schema"), (p["table"], "table"), (p["backup_schema"], "backup schema")] + [
            (c, "natural-key column") for c in p["natural_key"]] + [
            (n, w) for n, w in [(p["backup_table"], "backup table"), (p["order_by"], "order_by column"),
                                (p["constraint_name"], "constraint")] if n]:
        validate_identifier(name, what, module)
    try:
        result = OnlineDedup(module).run(lambda: connect(module, autocommit=True,
                                                         application_name="pg_online_dedup"))
    except DedupPgError as exc:
        module.fail_json(msg="%s.%s: %s" % (p["schema"], p["table"], exc))
    except Exception as exc:  # noqa: BLE001 - report any driver error readably
        module.fail_json(msg="online deduplication of %s.%s failed: %s. Every removed row is in the backup table "
                             "(same transaction as its delete); re-run to resume."
                             % (p["schema"], p["table"], error_text(exc, module)),
                         exception=traceback.format_exc())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
