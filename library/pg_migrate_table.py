#!/usr/bin/python
"""Apply one table's rendered migration (sql/migrate_table.sql.j2) in one transaction, with lock retries."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_migrate_table
short_description: Apply rendered deduplications, one transaction per table
description:
  - One table (C(sql), C(schema), C(table)) or many in one call (C(tables), as the role does it, one module run
    for every table of the step, in order). A table that fails is rolled back and the others go on, each in its own
    transaction, as a loop of one call per table did; the call then fails naming every table that failed. Once the
    play is gone no further table is started.
  - Runs the C(-- @step) sections of a migration rendered from C(sql/migrate_table.sql.j2) in one
    transaction (the file's own BEGIN/COMMIT are replaced by the module's), timing every step.
  - When a lock cannot be had within the file's C(lock_timeout) (or another session holds an older
    snapshot, or the server breaks a deadlock), the whole transaction is rolled back and retried after
    C(retry_delay), at most C(retries) times; then it fails naming the sessions in the way (pid, user,
    application, state, locks, query start, wait). Nothing is half-applied. The retry rules are those of
    C(module_utils/dedup_locks.py), shared with the other modules.
  - After the commit it runs C(ANALYZE) (and C(VACUUM FULL) for the delete strategy) on the table.
  - In check mode nothing is executed; the module says what it would run.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg, dedup_pg.run_lock]
options:
  sql:
    description: The rendered migration text (one table; with C(schema) and C(table)).
    type: str
  schema:
    description: Schema of the table (for the post-commit maintenance and messages).
    type: str
  table:
    description: The table.
    type: str
  tables:
    description:
      - Many tables in one call, applied in this order, each in its own transaction exactly as the one-table form
        does. Mutually exclusive with C(sql) and C(table).
    type: list
    elements: dict
    suboptions:
      schema:
        description: Schema of the table.
        type: str
        required: true
      table:
        description: The table.
        type: str
        required: true
      strategy:
        description: replace or delete.
        type: str
        default: replace
        choices: [replace, delete]
      sql:
        description: The table's rendered migration text.
        type: str
        required: true
  ledger_schema:
    description:
      - The ledger's schema (the backup schema). When set with C(run_id), the table's C(size_after) is written into
        its ledger row after the commit (the row the migration's own ledger step wrote).
    type: str
    default: ''
  strategy:
    description: replace or delete (delete is followed by VACUUM FULL).
    type: str
    default: replace
    choices: [replace, delete]
  retries:
    description: How many times a lock timeout is retried.
    type: int
    default: 5
  retry_delay:
    description: Seconds between attempts.
    type: float
    default: 3
  run_id:
    description:
      - The deploy's run id. Every statement is sent with a leading comment naming the run, the table, the step and
        the attempt, so that C(pg_migrate_progress) (or anyone looking at C(pg_stat_activity)) sees where it is.
    type: str
    default: ''
  progress_interval:
    description:
      - Handled by the action plugin (C(plugins/action/pg_migrate_table.py)). When above 0, the migration runs in the
        background under Ansible's async wrapper and a progress line (step, seconds, lock waits, index build counters)
        is printed every C(progress_interval) seconds; the task's result is the same. 0 runs it in the foreground.
    type: float
    default: 0
  progress_timeout:
    description: Longest a background migration may run (seconds) before Ansible's async wrapper stops it.
    type: int
    default: 86400
"""

EXAMPLES = r"""
- name: Deduplicate every rendered table in one call
  pg_migrate_table:
    login_db: breezeway
    tables: "{{ rendered.tables }}"   # from dedup_render_sql: schema, table, strategy, sql
    run_id: "{{ deploy_id }}"
    ledger_schema: dedup_backup
- name: Deduplicate task_requirements
  pg_migrate_table:
    login_db: breezeway
    schema: breezeway
    table: task_requirements
    sql: "{{ lookup('ansible.builtin.file', report_dir ~ '/sql/01_task_requirements.sql') }}"
"""

RETURN = r"""
results:
  description:
    - With C(tables), one entry per table, in order, with the keys of the one-table form (changed, ledger, steps,
      attempts, seconds, size_after, msg) plus C(schema) and C(table); a table that failed has C(failed=true) and
      its message.
  returned: when tables is given
  type: list
  elements: dict
failed_table:
  description: With C(tables), the first table that failed (nothing changed in it).
  returned: failure with tables
  type: str
failed_tables:
  description: With C(tables), every table that failed (nothing changed in them).
  returned: failure with tables
  type: list
  elements: str
ledger:
  description: rows_before, rows_kept, rows_removed, keep_fingerprint as recorded in the ledger.
  returned: success
  type: dict
steps:
  description: Name and seconds of every step of the successful attempt.
  returned: success
  type: list
attempts:
  description: Attempts made (1 = no lock retry was needed).
  returned: always
  type: int
seconds:
  description: Wall time including retries and maintenance.
  returned: always
  type: float
size_after:
  description: Total size of the table after the migration (indexes and TOAST included; summed over the
    partitions of a partitioned table), bytes.
  returned: success
  type: int
"""

import re
import time
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import Ledger
from ansible.module_utils.dedup_locks import (
    LockRetriesExhausted,
    PlayGone,
    PlayWatch,
    lock_failure_message,
    play_gone,
    sessions_in_the_way,
    with_lock_retries,
)
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    connect,
    error_text,
    get_table,
    pg_common_argument_spec,
    total_size,
)
from ansible.module_utils.dedup_plan import split_steps, step_marker

try:
    from psycopg2 import errors as pg_errors
    from psycopg2 import sql
except ImportError:  # pragma: no cover
    pg_errors = None
    sql = None

LOCK_TIMEOUT_RE = r"SET LOCAL lock_timeout = '((?:[^']|'')*)'"


def lock_timeout_of(text, default=None):
    """The lock_timeout the rendered migration sets (SET LOCAL lock_timeout = '...'), or ``default``."""
    found = re.search(LOCK_TIMEOUT_RE, text)
    return found.group(1).replace("''", "'") if found else default


def connection_lost(conn, exc):
    """Whether ``exc`` means the session is gone (admin shutdown, crash, restart, network)."""
    if conn.closed:
        return True
    code = getattr(exc, "pgcode", None) or ""
    if code.startswith("57P") or code.startswith("08"):  # admin/crash shutdown, cannot connect now; connection
        return True
    return pg_errors is not None and isinstance(exc, (pg_errors.OperationalError, pg_errors.InterfaceError)) \
        and getattr(exc, "pgcode", None) is None


class NoDuplicates(Exception):
    """The keep-set holds every row: there is nothing to remove, so nothing is rewritten."""


def run_once(conn, steps, marker):
    timings = []
    ledger = None
    with conn.cursor() as cur:
        for number, (name, body) in enumerate(steps, start=1):
            t0 = time.monotonic()
            cur.execute(marker(name, number) + body)
            if name == "keep":
                cur.execute("SELECT coalesce(sum(dedup_n), 0) = count(*) FROM dedup_keep")
                if cur.fetchone()[0]:
                    raise NoDuplicates()
            if name == "ledger":
                row = cur.fetchone()
                ledger = {"rows_before": row[0], "rows_kept": row[1], "rows_removed": row[2],
                          "keep_fingerprint": row[3]}
            timings.append({"step": name, "seconds": round(time.monotonic() - t0, 3), "rows": cur.rowcount})
    conn.commit()
    return timings, ledger


def show_waiting(conn, marker):
    """Leave a marker as the session's last statement while it sleeps (outside any transaction)."""
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.Composed([sql.SQL(marker), sql.SQL("SELECT 1")]))
    except Exception:  # noqa: BLE001 - only for progress display
        pass
    finally:
        if not conn.closed:
            conn.autocommit = False


class TableFailed(Exception):
    """One table's migration failed (rolled back); ``msg`` names the table, ``extra`` goes into the result.
    ``stop``: the play is gone, so no further table is started either."""

    def __init__(self, msg, stop=False, **extra):
        super().__init__(msg)
        self.msg = msg
        self.stop = stop
        self.extra = extra


def check_steps(module, text, where):
    steps = split_steps(text)
    if not steps or steps[-1][0] != "ledger":
        module.fail_json(msg="the migration text of %s has no '-- @step' sections ending with the ledger step; "
                             "render it from sql/migrate_table.sql.j2" % where)
    return steps


def migrate_one(module, p, job, watch, first=True):
    """Apply one table's migration (``job``: schema, table, strategy, sql) as the single mode does; the result dict,
    or :class:`TableFailed` (nothing changed in that table). Before any table but the first of a call, it stops
    when the play that started the module is gone (``watch``)."""
    where = "%s.%s" % (job["schema"], job["table"])
    steps = check_steps(module, job["sql"], where)
    started = time.monotonic()
    conn = connect(module, autocommit=False)
    if not first and play_gone(conn, watch):
        conn.close()
        raise TableFailed("the play that started the migration is gone; stopped before %s, nothing changed in this "
                          "table" % where, stop=True, attempts=0)
    attempts = 0
    timings = ledger = None

    def marker(name, number):
        return step_marker(p["run_id"], job["schema"], job["table"], name, number, len(steps), attempts)

    def attempt(number):
        nonlocal attempts
        attempts = number
        return run_once(conn, steps, marker)

    try:
        (timings, ledger), attempts = with_lock_retries(
            conn, attempt, p["retries"], p["retry_delay"], watch=watch,
            before_retry=lambda _n, _exc: show_waiting(conn, marker("retry_wait", 0)))
    except NoDuplicates:
        conn.rollback()
        conn.close()
        return dict(changed=False, attempts=attempts, seconds=round(time.monotonic() - started, 3),
                    steps=[], ledger=None, msg="%s has no duplicates: left as it is" % where)
    except PlayGone as gone:
        # The play that started us is gone (killed): do not go on changing the table behind the back of whoever
        # looks next (a re-run or a rollback).
        conn.close()
        raise TableFailed("the play that started the migration of %s is gone; stopped before attempt %d, nothing "
                          "changed in this table" % (where, gone.attempts + 1), stop=True,
                          attempts=gone.attempts) from None
    except LockRetriesExhausted as exc:
        last_error = error_text(exc.error, module)
        info = None
        try:
            conn.rollback()
            conn.autocommit = True
            with conn.cursor() as cur:
                info = get_table(cur, job["schema"], job["table"])
        except (DedupPgError, Exception):  # noqa: BLE001 - best effort for the message
            pass
        holders = sessions_in_the_way(conn, info["oid"]) if info else []
        if "older than this migration" in last_error:
            raise TableFailed(
                "%s was not migrated after %d attempts: other sessions kept a snapshot older than the "
                "migration (%s). A reader with such a snapshot (pg_dump, a REPEATABLE READ or SERIALIZABLE "
                "transaction, a logical replication table sync) would have seen the table empty after the "
                "TRUNCATE, so the migration was rolled back each time; nothing changed in this table. Let them "
                "finish and re-run (the run resumes here), or set preflight_strategy: delete (MVCC-safe, slower) "
                "for this database." % (where, exc.attempts, last_error),
                attempts=exc.attempts, blockers=holders) from None
        raise TableFailed(
            lock_failure_message(where, exc.attempts, last_error, holders,
                                 lock_timeout=lock_timeout_of(job["sql"]), delay=p["retry_delay"],
                                 outcome="nothing changed in this table",
                                 advice="Stop them (or wait) and re-run: the run resumes here."),
            attempts=exc.attempts, blockers=holders) from None
    except Exception as exc:  # noqa: BLE001
        if connection_lost(conn, exc):
            # Terminated backend (pg_terminate_backend) or a server restart: the server rolled the
            # transaction back; the ledger row is in it, so this table is simply not done.
            raise TableFailed(
                "the connection to the server was lost during the migration of %s (backend terminated "
                "or server restarted: %s); the server rolled the transaction back, nothing changed in this "
                "table. Re-run deploy_dedup.yml when the server is back: the run resumes here."
                % (where, error_text(exc, module) or type(exc).__name__), attempts=attempts) from None
        raise TableFailed(
            "migration of %s failed and was rolled back (nothing changed in this table): %s"
            % (where, error_text(exc, module)), attempts=attempts, exception=traceback.format_exc()) from None
    # Maintenance after the commit (not in the transaction).
    conn.autocommit = True
    with conn.cursor() as cur:
        target = sql.Identifier(job["schema"], job["table"])
        t0 = time.monotonic()
        if job["strategy"] == "delete":
            # VACUUM FULL queues for ACCESS EXCLUSIVE like the migration did (and everyone queues behind it): never
            # longer than the migration's own lock_timeout. The rows are already committed and recorded, so a
            # timeout only postpones giving the space back.
            wait = lock_timeout_of(job["sql"], "5s")
            cur.execute("SELECT set_config('lock_timeout', %s, false)", (wait,))
            try:
                cur.execute(sql.SQL("VACUUM (FULL, ANALYZE) {}").format(target))
                timings.append({"step": "vacuum_full_analyze", "seconds": round(time.monotonic() - t0, 3),
                                "rows": -1})
            except pg_errors.LockNotAvailable as exc:
                module.warn(
                    "%s is deduplicated and recorded, but its VACUUM FULL could not get its lock within "
                    "lock_timeout=%s (%s): the space of the removed rows is not given back yet (the table keeps "
                    "its size; new rows reuse it). Run later, when the table is quiet: VACUUM (FULL, ANALYZE) %s; "
                    "(or pg_repack)." % (where, wait, error_text(exc, module), target.as_string(conn)))
                timings.append({"step": "vacuum_full_skipped", "seconds": round(time.monotonic() - t0, 3),
                                "rows": -1})
                try:  # statistics at least (SHARE UPDATE EXCLUSIVE: readers and writers do not conflict with it)
                    cur.execute(sql.SQL("ANALYZE {}").format(target))
                except pg_errors.LockNotAvailable:
                    pass
            cur.execute("SELECT set_config('lock_timeout', '0', false)")
        else:
            cur.execute(sql.SQL("ANALYZE {}").format(target))
            timings.append({"step": "analyze", "seconds": round(time.monotonic() - t0, 3), "rows": -1})
        cur.execute("SELECT %s::regclass::oid", (target.as_string(conn),))
        size_after = total_size(cur, cur.fetchone()[0])
        if p["ledger_schema"] and p["run_id"]:
            # The table's size after, in its ledger row (the row the migration's own ledger step wrote).
            Ledger(p["ledger_schema"]).put_table(cur, p["run_id"], job["schema"], job["table"],
                                                 {"size_after": size_after})
    conn.close()
    return dict(changed=True, ledger=ledger, steps=timings, attempts=attempts, size_after=size_after,
                seconds=round(time.monotonic() - started, 3))


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        sql=dict(type="str"),
        schema=dict(type="str"),
        table=dict(type="str"),
        strategy=dict(type="str", default="replace", choices=["replace", "delete"]),
        tables=dict(type="list", elements="dict", options=dict(
            schema=dict(type="str", required=True),
            table=dict(type="str", required=True),
            strategy=dict(type="str", default="replace", choices=["replace", "delete"]),
            sql=dict(type="str", required=True),
        )),
        ledger_schema=dict(type="str", default=""),
        retries=dict(type="int", default=5),
        retry_delay=dict(type="float", default=3.0),
        run_id=dict(type="str", default=""),
        run_lock_id=dict(type="str", default=""),
        progress_interval=dict(type="float", default=0.0),
        progress_timeout=dict(type="int", default=86400),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           mutually_exclusive=[("tables", "sql"), ("tables", "table")],
                           required_one_of=[("tables", "sql")],
                           required_together=[("sql", "schema", "table")])
    p = module.params
    single = p["tables"] is None
    jobs = [dict(schema=p["schema"], table=p["table"], strategy=p["strategy"], sql=p["sql"])] if single \
        else p["tables"]
    plans = [check_steps(module, job["sql"], "%s.%s" % (job["schema"], job["table"])) for job in jobs]
    if module.check_mode:
        results = [dict(schema=job["schema"], table=job["table"], changed=True, attempts=0, seconds=0.0,
                        steps=[{"step": n} for n, _ in steps],
                        msg="would deduplicate %s.%s in one transaction (%d steps)" % (
                            job["schema"], job["table"], len(steps)))
                   for job, steps in zip(jobs, plans)]
        if single:
            module.exit_json(**{k: v for k, v in results[0].items() if k not in ("schema", "table")})
        module.exit_json(changed=bool(results), results=results,
                         msg="would deduplicate %d table(s), one transaction each" % len(results))
    started = time.monotonic()
    results, failures = [], []
    watch = PlayWatch(p["run_lock_id"], every=0)
    for number, job in enumerate(jobs):
        try:
            one = migrate_one(module, p, job, watch, first=number == 0)
        except TableFailed as failed:
            if single:
                module.fail_json(msg=failed.msg, **failed.extra)
            # As a loop of one call per table did: the other tables go on (each is its own transaction), unless the
            # play is gone. The call fails at the end, naming every table that failed.
            failures.append((job, failed))
            results.append(dict(failed.extra, schema=job["schema"], table=job["table"], changed=False, failed=True,
                                msg=failed.msg))
            if failed.stop:
                break
            continue
        if single:
            module.exit_json(**one)
        results.append(dict(one, schema=job["schema"], table=job["table"]))
    changed = [r for r in results if r["changed"]]
    if failures:
        done = [r["table"] for r in changed]
        module.fail_json(
            msg="%s (deduplicated and committed in this step: %s)" % (
                "; ".join(f.msg for _job, f in failures), ", ".join(done) if done else "none"),
            changed=bool(done), results=results, failed_table=failures[0][0]["table"],
            failed_tables=[job["table"] for job, _f in failures], **failures[0][1].extra)
    module.exit_json(changed=bool(changed), results=results, seconds=round(time.monotonic() - started, 3),
                     msg="%d of %d table(s) deduplicated, one transaction each" % (len(changed), len(results)))


if __name__ == "__main__":
    main()
