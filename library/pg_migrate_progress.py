#!/usr/bin/python
"""Where a long-running task is: a table migration, a pg_dump, a unique index build or a rollback's restore."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_migrate_progress
short_description: Report the progress of a migration, dump, index build or restore that runs in the background
description:
  - The reader of the shared progress mechanism (plugins/action/dedup_progress.py); C(kind) says what to look at.
  - C(kind=dump) - the pg_dump of C(pg_dump_backup) writing C(<path>.partial-*) - bytes written so far against
    C(estimate_bytes), and whether pg_dump's session waits for a lock (and who holds it); once pg_dump is done,
    that the archive is being read back.
  - C(kind=index) - the UNIQUE index build of C(pg_unique_constraint) on C(schema.table) - phase, blocks and tuples
    from C(pg_stat_progress_create_index), or the lock its DDL waits for. With C(tables) (its list mode), the first
    of those tables with a running build or DDL session.
  - C(kind=restore) - C(pg_restore_rows) on C(schema.table) - rows read from the dump so far
    (C(pg_stat_progress_copy)), or the insert of the removed rows and how long it runs, and lock waits.
  - C(kind=migrate) (the default), as follows.
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
  kind:
    description: What runs in the background.
    type: str
    choices: [migrate, dump, index, restore]
    default: migrate
  run_id:
    description: The run id the migration was started with (C(kind=migrate)).
    type: str
    default: ""
  schema:
    description: Schema of the table (all kinds but C(dump)).
    type: str
  table:
    description: The table (all kinds but C(dump)).
    type: str
  tables:
    description:
      - Instead of C(schema) and C(table) - the tables of a list-mode call, each a C([schema, table]) pair, in order -
        C(kind=index) for C(pg_unique_constraint), C(kind=migrate) for C(pg_migrate_table); the reader follows
        whichever of them is being worked on.
    type: list
    elements: list
  path:
    description: Final path of the dump; its C(.partial-*) files are measured (C(kind=dump)).
    type: path
  estimate_bytes:
    description: Expected size of the dump, for a percentage (0 = unknown) (C(kind=dump)).
    type: int
    default: 0
  rows:
    description: Rows the restore puts back (-1 = unknown) (C(kind=restore)).
    type: int
    default: -1
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
kind:
  description: What was looked at (C(dump), C(index), C(restore); absent for C(migrate)).
  returned: when kind is not migrate
  type: str
bytes_written:
  description: Bytes of the dump's partial file (or directory) so far.
  returned: when kind is dump and running
  type: int
partial:
  description: Path of the partial dump being written.
  returned: when kind is dump and running
  type: str
rows_read:
  description: Rows read from the dump so far (C(pg_stat_progress_copy)), or null outside that phase.
  returned: when kind is restore and running
  type: int
rows_back:
  description: Rows put back so far by a restore that runs in slices (C(kind=restore); null otherwise).
  returned: when kind is restore and running
  type: int
msg:
  description: One readable line.
  returned: always
  type: str
"""

import contextlib
import glob
import os
import re
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_dump import PARTIAL
from ansible.module_utils.dedup_pg import APP_PREFIX, connect, pg_common_argument_spec
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
    """The migration session of run_id working on schema.table (or on any of ``tables``), or None."""
    wanted = [[str(x) for x in pair] for pair in p["tables"]] if p.get("tables") else [[p["schema"], p["table"]]]
    cur.execute(ACTIVITY, (len(MARKER_PREFIX), MARKER_PREFIX))
    for pid, state, query, wtype, wevent, blockers, step_s, xact_s in cur.fetchall():
        mark = parse_marker(query)
        if not mark or mark.get("run") != p["run_id"] or [mark.get("schema"), mark.get("table")] not in wanted:
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
    where = "%s.%s" % (mark.get("schema"), mark.get("table"))
    if p.get("tables") and len(p["tables"]) > 1:
        wanted = [[str(x) for x in pair] for pair in p["tables"]]
        where = "(table %d of %d) %s" % (wanted.index([mark.get("schema"), mark.get("table")]) + 1, len(wanted), where)
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


# --------------------------------------------------------------------------- dump, index, restore


def human(n):
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return ("%.0f %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0
    return "%.1f TB" % n


def written(path):
    """Bytes of the newest ``<path>.partial-*`` (a file, or a directory's files), and its name; (None, None)."""
    cands = [c for c in glob.glob(glob.escape(path) + PARTIAL + "*") if os.path.lexists(c)]
    if not cands:
        return None, None
    newest = max(cands, key=lambda c: os.lstat(c).st_mtime)
    if os.path.isdir(newest):
        total = 0
        for root, _dirs, names in os.walk(newest):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total, newest
    try:
        return os.lstat(newest).st_size, newest
    except OSError:
        return None, None


SESSIONS = """
SELECT a.pid, a.state, a.wait_event_type, a.wait_event, pg_catalog.pg_blocking_pids(a.pid),
       round(extract(epoch FROM now() - a.query_start)::numeric, 1)::float8, left(a.query, 200)
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_catalog.pg_backend_pid() AND a.application_name = %s
  AND a.state <> 'idle'
ORDER BY a.backend_start
"""


def sessions(cur, app):
    cur.execute(SESSIONS, (APP_PREFIX + app,))
    return [{"pid": r[0], "state": r[1], "wait_event_type": r[2], "wait_event": r[3], "blockers": list(r[4] or []),
             "seconds": r[5], "query": r[6] or ""} for r in cur.fetchall()]


def lock_text(found):
    for s in found:
        if s["wait_event_type"] == "Lock":
            return "; waiting for a lock (%s) held by pid(s) %s" % (
                s["wait_event"], ", ".join(str(b) for b in s["blockers"]) or "?")
    return ""


def dump_progress(cur, p):
    size, partial = written(p["path"])
    found = sessions(cur, "pg_dump")
    if partial is None and not found:
        return None
    done = "%s written" % human(size or 0)
    if p["estimate_bytes"] > 0:
        done += " of ~%s estimated (%.0f%%)" % (human(p["estimate_bytes"]), 100.0 * (size or 0) / p["estimate_bytes"])
    db = cur.connection.get_dsn_parameters().get("dbname", "?")
    if found:
        line = "pg_dump of %s: %s into %s" % (db, done, partial or p["path"] + PARTIAL + "*")
        line += lock_text(found)
    else:
        line = "pg_dump of %s done (%s); reading the archive back whole to verify it" % (db, human(size or 0))
    return {"msg": line, "bytes_written": size or 0, "estimate_bytes": p["estimate_bytes"], "partial": partial,
            "sessions": [s["pid"] for s in found]}


INDEX_PROGRESS = """
SELECT u.ord, pid, phase, blocks_done, blocks_total, tuples_done, tuples_total, lockers_done, lockers_total
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY u(s, t, ord)
JOIN pg_catalog.pg_stat_progress_create_index p ON p.relid = to_regclass(format('%%I.%%I', u.s, u.t))
WHERE p.datname = current_database()
ORDER BY u.ord LIMIT 1
"""

LOCKED_TABLE = """
SELECT u.ord, l.pid
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY u(s, t, ord)
JOIN pg_catalog.pg_locks l ON l.relation = to_regclass(format('%%I.%%I', u.s, u.t))
WHERE l.pid = ANY (%s::int[])
ORDER BY u.ord LIMIT 1
"""


def index_progress(cur, p):
    pairs = [(str(s), str(t)) for s, t in p["tables"]] if p.get("tables") else [(p["schema"], p["table"])]
    schemas, tables = [s for s, _ in pairs], [t for _, t in pairs]
    cur.execute(INDEX_PROGRESS, (schemas, tables))
    row = cur.fetchone()
    found = sessions(cur, "pg_unique_constraint")
    if row:
        ord_, pid, phase, bdone, btotal, tdone, ttotal, ldone, ltotal = row
        where = "%s.%s" % pairs[ord_ - 1]
        line = "%s: UNIQUE index build: %s" % (where, phase)
        if btotal:
            line += ", blocks %d of %d (%.0f%%)" % (bdone, btotal, 100.0 * bdone / btotal)
        if ttotal:
            line += ", tuples %d of %d" % (tdone, ttotal)
        if ltotal:
            line += ", waited for %d of %d older transactions" % (ldone, ltotal)
        mine = [s for s in found if s["pid"] == pid]
        line += lock_text(mine)
        return {"msg": line, "server_progress": {"phase": phase, "blocks_done": bdone, "blocks_total": btotal,
                                                 "tuples_done": tdone, "tuples_total": ttotal}, "pid": pid}
    if found:
        s = found[0]
        where = "%s.%s" % pairs[0]
        if len(pairs) > 1:  # list mode: the table its session holds or waits for a lock on
            cur.execute(LOCKED_TABLE, (schemas, tables, [f["pid"] for f in found]))
            locked = cur.fetchone()
            if locked:
                where = "%s.%s" % pairs[locked[0] - 1]
                s = next(f for f in found if f["pid"] == locked[1])
            else:
                where = "UNIQUE constraints of %d tables" % len(pairs)
        return {"msg": "%s: constraint DDL running %.1f s%s" % (where, s["seconds"] or 0, lock_text(found) or
                                                               " (" + " ".join(s["query"].split())[:80] + ")"),
                "pid": s["pid"]}
    return None


def restore_progress(cur, p):
    where = "%s.%s" % (p["schema"], p["table"])
    found = sessions(cur, "pg_restore_rows")
    if not found:
        return None
    s = found[0]
    expect = " of %d" % p["rows"] if p["rows"] >= 0 else ""
    copied = None
    with contextlib.suppress(Exception):  # pg_stat_progress_copy: PostgreSQL 14+
        cur.execute("SELECT tuples_processed, bytes_processed FROM pg_catalog.pg_stat_progress_copy WHERE pid = %s",
                    (s["pid"],))
        copied = cur.fetchone()
    q = s["query"].lstrip().upper()
    back = re.match(r"/\* DEDUP-ROLLOUT RESTORE: (\d+) OF (\d+) ROWS PUT BACK \*/\s*INSERT", q)
    if copied:
        line = "%s: reading the table's rows from the dump: %d rows, %s so far" % (where, copied[0], human(copied[1]))
    elif back:
        done, total = int(back.group(1)), int(back.group(2))
        line = "%s: putting back the removed rows: %d of %d back (%.0f%%), this slice running %.1f s" % (
            where, done, total, 100.0 * done / max(total, 1), s["seconds"] or 0)
    elif q.startswith("INSERT"):
        line = "%s: putting back the removed rows%s: the insert has run %.1f s" % (where, expect, s["seconds"] or 0)
    else:
        line = "%s: restoring%s rows, %s (%.1f s)" % (where, expect, " ".join(q.split())[:60].lower() or "working",
                                                      s["seconds"] or 0)
    return {"msg": line + lock_text(found), "pid": s["pid"], "rows_read": copied[0] if copied else None,
            "rows_back": int(back.group(1)) if back and not copied else None}


READERS = {"dump": dump_progress, "index": index_progress, "restore": restore_progress}


def other_kind(module, conn, p):
    if p["kind"] == "dump" and not p["path"]:
        module.fail_json(msg="kind=dump needs path (the dump's final path)")
    if p["kind"] == "index" and p["tables"]:
        if not all(isinstance(pair, list) and len(pair) == 2 and all(pair) for pair in p["tables"]):
            module.fail_json(msg="tables must list [schema, table] pairs")
    elif p["kind"] != "dump" and not (p["schema"] and p["table"]):
        module.fail_json(msg="kind=%s needs schema and table" % p["kind"])
    deadline = time.monotonic() + max(0.0, p["wait"])
    with conn.cursor() as cur:
        while True:
            out = READERS[p["kind"]](cur, p)
            if out is None or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    conn.close()
    if out is None:
        module.exit_json(changed=False, running=False, kind=p["kind"], msg="%s: nothing running now" % p["kind"])
    module.exit_json(changed=False, running=True, kind=p["kind"], **out)


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        kind=dict(type="str", default="migrate", choices=["migrate", "dump", "index", "restore"]),
        run_id=dict(type="str", default=""),
        schema=dict(type="str"),
        table=dict(type="str"),
        tables=dict(type="list", elements="list"),
        path=dict(type="path"),
        estimate_bytes=dict(type="int", default=0),
        rows=dict(type="int", default=-1),
        wait=dict(type="float", default=10.0),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    conn = connect(module, autocommit=True, application_name="progress", readonly=True)
    if p["kind"] != "migrate":
        other_kind(module, conn, p)
    if p["tables"] and not all(isinstance(pair, list) and len(pair) == 2 and all(pair) for pair in p["tables"]):
        module.fail_json(msg="tables must list [schema, table] pairs")
    if not (p["run_id"] and (p["tables"] or (p["schema"] and p["table"]))):
        module.fail_json(msg="kind=migrate needs run_id, and schema and table (or tables)")
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
            what = "%s.%s" % (p["schema"], p["table"]) if not p["tables"] else "%d table(s)" % len(p["tables"])
            module.exit_json(changed=False, running=False,
                             msg="%s: the migration's session is not working on it now" % what)
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
