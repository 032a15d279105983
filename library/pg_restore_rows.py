#!/usr/bin/python
"""Put back the rows a dedup-rollout deploy removed from one table (from its backup table or its dump)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_restore_rows
short_description: Put back the rows a dedup-rollout deploy removed from one table, losing nothing written since
description:
  - Reads the removed rows from the deploy's backup table (C(backup_schema).C(backup_table), backup mode
    C(table)) or, when that table is gone or the deploy ran in backup mode C(dump), from the deploy's
    pg_dump file; inserts every one of them whose primary key is not in the table, and nothing else.
    Rows the table has now (new rows, rows updated since the deploy) are never deleted or overwritten.
  - From a dump, C(pg_restore --data-only) of that table's TABLE DATA entry alone is written to a pipe
    (pg_restore connects to no database, so no password is handed to it), loaded into a staging table in
    C(staging_schema), and reduced to the removed rows by the deploy's own rule (per natural key the
    C(keep) row by C(order_by) stayed, the others were removed). Their number must equal C(rows_removed)
    unless C(allow_incomplete).
  - One transaction per table, with C(lock_timeout) and C(retries) after a lock timeout or a deadlock (the retry
    rules of C(module_utils/dedup_locks.py)); out of attempts it fails naming the sessions in the way, and between
    two attempts it stops once the play that started it is gone. Identity columns
    are inserted with C(OVERRIDING SYSTEM VALUE), generated columns are left to the server, and the table's
    user triggers do not fire for the restored rows (as in the migration). In the same transaction the
    ledger row of the table (C(table_runs) of run C(run_id)) is set to C(rolled_back).
  - A table without a primary key is restored in full exactly once (the ledger status, changed in the same
    transaction, says whether that happened).
  - Idempotent. Rows already there are skipped, so a second run inserts nothing (C(changed=false)).
  - Check mode reads only (a dump is loaded into a temporary table of a transaction that is rolled back) and
    returns in C(restored) the number of rows it would put back. C(verify_only) only checks that a source
    holds the rows (backup table row count, or the dump's TABLE DATA entry); it loads and writes nothing.
  - The dump's checksum is not verified here; the playbook verifies it once per dump before calling this.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg, dedup_pg.run_lock]
options:
  schema:
    description: Schema of the table.
    type: str
    required: true
  table:
    description: The table.
    type: str
    required: true
  natural_key:
    description: The deploy's natural key of the table (rebuilds the removed rows from a dump).
    type: list
    elements: str
    required: true
  keep:
    description: Which row per key the deploy kept.
    type: str
    choices: [oldest, newest]
    default: oldest
  order_by:
    description: Column that decided the kept row (default the single-column primary key).
    type: str
  run_id:
    description: The deploy being rolled back (its ledger row of the table is marked C(rolled_back)).
    type: str
    required: true
  backup_schema:
    description: Schema of the ledger and the backup tables.
    type: str
    default: dedup_rollout
  backup_table:
    description: Backup table of the removed rows, in C(backup_schema).
    type: str
  rows_removed:
    description: Rows the deploy removed (from the ledger); checked against the source.
    type: int
  source:
    description: C(auto) means the backup table when it is there with C(rows_removed) rows, else the dump.
    type: str
    choices: [auto, table, dump]
    default: auto
  dump_path:
    description: The deploy's pg_dump file or directory, on this host.
    type: path
  pg_restore:
    description: pg_restore executable.
    type: str
    default: pg_restore
  staging_schema:
    description: Owner-only schema for the staging table of a dump restore (created when needed).
    type: str
    default: dedup_rollout_staging
  allow_incomplete:
    description: Put back what the dump holds even when it has fewer removed rows than C(rows_removed).
    type: bool
    default: false
  verify_only:
    description: Only check that a source holds the rows; load nothing, write nothing.
    type: bool
    default: false
  lock_timeout:
    description: lock_timeout per attempt (PostgreSQL interval text).
    type: str
    default: 5s
  retries:
    description: Extra attempts after a lock timeout.
    type: int
    default: 5
  retry_delay:
    description: Seconds between attempts.
    type: float
    default: 3
  batch_rows:
    description:
      - Put the rows back in slices of about this many rows (by blocks of the source table, PostgreSQL 14 and
        later), all in the table's one transaction, so the progress line can say how many are back. C(0) = one
        statement.
    type: int
    default: 100000
notes:
  - Needs psycopg2 on the target, and pg_restore for a dump restore. Supports check mode.
"""

EXAMPLES = r"""
- name: Put back the removed rows of task_photos
  pg_restore_rows:
    schema: breezeway
    table: task_photos
    natural_key: [task_pk, photo_id]
    run_id: 20251202T010000Z
    backup_table: task_photos__20251202T010000Z
    rows_removed: 689312
    dump_path: /var/backups/dedup-rollout/breezeway-20251202T010000Z.dump
"""

RETURN = r"""
source:
  description: Where the rows came from (table, dump) or none when the deploy removed no rows.
  returned: always
  type: str
restored:
  description: Rows inserted (would be, in check mode).
  returned: always
  type: int
present:
  description: Removed rows that were already in the table (by primary key).
  returned: always
  type: int
source_rows:
  description: Removed rows the source holds.
  returned: always
  type: int
ledger_marked:
  description: Whether the ledger row changed to rolled_back (would, in check mode).
  returned: always
  type: bool
attempts:
  description: Transaction attempts (lock timeouts retried).
  returned: always
  type: int
queries:
  description: The SQL statements run in the last attempt (no data).
  returned: always
  type: list
  elements: str
"""

import os
import re
import subprocess
import tempfile
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import Ledger
from ansible.module_utils.dedup_locks import (
    LockRetriesExhausted,
    PlayGone,
    PlayWatch,
    lock_failure_message,
    sessions_in_the_way,
    with_lock_retries,
)
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    check_columns,
    connect,
    error_text,
    get_table,
    pg_common_argument_spec,
    qualified,
    sql,
    validate_identifier,
)

COPY_RE = re.compile(r'^COPY (?P<rel>.+?) \((?P<cols>.*)\) FROM stdin;$')
IDENT_RE = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^",\s]+))\s*(?:,|$)')


def parse_idents(text):
    """Column list of a COPY header as pg_dump writes it (quoted where needed)."""
    out, pos = [], 0
    while pos < len(text):
        m = IDENT_RE.match(text, pos)
        if not m or m.end() == pos:
            raise DedupPgError("cannot parse the column list of the dump's COPY line: %s" % text)
        out.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2))
        pos = m.end()
    return out


class CopyStream:
    """File-like reader over pg_restore's script output: only the COPY data, up to the terminator."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.done = False
        self.rows = 0

    def read(self, size=-1):
        if self.done:
            return b""
        chunks, total = [], 0
        while not self.done and (size < 0 or total < size):
            line = self.pipe.readline()
            if not line or line in (b"\\.\n", b"\\.\r\n", b"\\."):
                self.done = True
                break
            self.rows += 1
            chunks.append(line)
            total += len(line)
        return b"".join(chunks)


class Restorer:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.queries = []
        self.cur = None
        # the ledger's statements run (and are listed in queries) in the restore's own transaction
        self.ledger = Ledger(self.p["backup_schema"], execute=lambda _cur, stmt, params: self.q(stmt, params))

    def q(self, query, params=None):
        text = query.as_string(self.cur) if hasattr(query, "as_string") else query
        self.queries.append(text)
        self.cur.execute(query, params)

    # ------------------------------------------------------------------ sources

    def backup_rows(self, cur):
        p = self.p
        if not p["backup_table"]:
            return None
        cur.execute("SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                    (p["backup_schema"], p["backup_table"]))
        if not cur.fetchone()[0]:
            return None
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(qualified(p["backup_schema"], p["backup_table"])))
        return cur.fetchone()[0]

    def dump_entry(self):
        """The TABLE DATA line of the table in the dump's table of contents, or a reason why not."""
        p = self.p
        path = p["dump_path"]
        if not path:
            return None, "no dump is recorded for this deploy"
        if not os.path.exists(path):
            return None, "the dump %s is not on this host" % path
        proc = subprocess.run([p["pg_restore"], "--list", path], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, "pg_restore --list %s failed: %s" % (path, proc.stderr.strip())
        want = " TABLE DATA %s %s " % (p["schema"], p["table"])
        for line in proc.stdout.splitlines():
            if not line.startswith(";") and want in line:
                return line, None
        return None, "the dump %s has no TABLE DATA entry for %s.%s" % (path, p["schema"], p["table"])

    def choose_source(self, cur):
        p = self.p
        expected = p["rows_removed"]
        problems = []
        if p["source"] in ("auto", "table"):
            n = self.backup_rows(cur)
            if n is None:
                problems.append("backup table %s.%s is gone" % (p["backup_schema"], p["backup_table"])
                                if p["backup_table"] else "the deploy kept no backup table (backup mode dump)")
            elif expected is not None and n != expected:
                problems.append("backup table %s.%s has %d rows, the deploy removed %d"
                                % (p["backup_schema"], p["backup_table"], n, expected))
            else:
                return "table", n, None
            if p["source"] == "table":
                raise DedupPgError("; ".join(problems))
        entry, why = self.dump_entry()
        if entry is None:
            problems.append(why)
            raise DedupPgError("no usable source for the rows removed from %s.%s: %s"
                               % (p["schema"], p["table"], "; ".join(problems)))
        return "dump", None, entry

    # ------------------------------------------------------------------ dump -> staging

    def load_dump(self, conn, info, entry, staging_schema):
        """Load the table's rows from the dump into a staging table; reduce it to the removed rows."""
        p = self.p
        cur = self.cur
        staging = "%s__%s" % (p["table"][:40], p["run_id"][:20])
        rel = sql.Identifier(staging) if staging_schema is None else qualified(staging_schema, staging)
        with tempfile.NamedTemporaryFile("w", suffix=".list", delete=False) as fh:
            fh.write(entry + "\n")
            listfile = fh.name
        try:
            # pg_restore's output is streamed into COPY FROM STDIN while it is written: module.run_command would
            # hold a whole table's rows in memory first.
            # sanity-ignore: validate-modules:use-run-command-not-popen streams pg_restore into COPY (see above)
            proc = subprocess.Popen([p["pg_restore"], "--data-only", "--use-list=" + listfile, "--file=-",
                                     p["dump_path"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            header, encoding = None, None
            while True:
                line = proc.stdout.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip("\n")
                m = re.match(r"^SET client_encoding = '([^']+)';$", text)
                if m:
                    encoding = m.group(1)
                if text.startswith("COPY "):
                    header = COPY_RE.match(text)
                    break
            if header is None:
                proc.kill()
                raise DedupPgError("pg_restore wrote no COPY data for %s.%s from %s: %s"
                                   % (p["schema"], p["table"], p["dump_path"], proc.stderr.read().decode()[:500]))
            cols = parse_idents(header.group("cols"))
            check_columns(info, cols, None, "column of the dump")
            col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            if staging_schema is None:
                self.q(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM ONLY {} WITH NO DATA")
                       .format(rel, col_ids, qualified(p["schema"], p["table"])))
            else:
                self.q(sql.SQL("DROP TABLE IF EXISTS {}").format(rel))
                self.q(sql.SQL("CREATE TABLE {} AS SELECT {} FROM ONLY {} WITH NO DATA")
                       .format(rel, col_ids, qualified(p["schema"], p["table"])))
                self.q(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(rel))
            old_encoding = conn.encoding
            if encoding:
                conn.set_client_encoding(encoding)
            stream = CopyStream(proc.stdout)
            copy = sql.SQL("COPY {} ({}) FROM STDIN").format(rel, col_ids)
            self.queries.append(copy.as_string(cur))
            cur.copy_expert(copy, stream)
            if encoding:
                conn.set_client_encoding(old_encoding)
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace")
            if proc.wait() != 0:
                raise DedupPgError("pg_restore failed reading %s: %s" % (p["dump_path"], err.strip()[:500]))
        finally:
            os.unlink(listfile)
        # Reduce the staging table to the rows the deploy removed: drop the kept row of every key.
        rowid = info["primary_key"] or ["ctid"]
        order_by = p["order_by"] or (info["primary_key"][0] if len(info["primary_key"]) == 1 else None)
        if order_by is None:
            raise DedupPgError("%s.%s has no single-column primary key: give order_by" % (p["schema"], p["table"]))
        direction = sql.SQL("ASC") if p["keep"] == "oldest" else sql.SQL("DESC")
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in p["natural_key"])
        order = [sql.SQL("{} {}").format(sql.Identifier(order_by), direction)]
        order += [sql.SQL("{} {}").format(sql.Identifier(c), direction) for c in info["primary_key"]]
        ids = sql.SQL(", ").join(sql.Identifier(c) for c in rowid)
        match = sql.SQL(" AND ").join(sql.SQL("s.{0} = k.{0}").format(sql.Identifier(c)) for c in rowid)
        self.q(sql.SQL("DELETE FROM {rel} s USING (SELECT DISTINCT ON ({keys}) {ids} FROM {rel} "
                       "ORDER BY {keys}, {order}) k WHERE {match}")
               .format(rel=rel, keys=keys, ids=ids, order=sql.SQL(", ").join(order), match=match))
        self.q(sql.SQL("SELECT count(*) FROM {}").format(rel))
        return rel, cols, cur.fetchone()[0]

    # ------------------------------------------------------------------ the transaction

    def insert_in_batches(self, rel, insert, missing, order, todo):
        """Run ``insert + missing + order``; for ``batch_rows`` or more rows from a plain table on PostgreSQL 14+
        (TID range scans), in slices of the source's blocks, all in this one transaction. Each statement opens
        with a comment saying how many rows are back so far, which pg_migrate_progress (kind=restore) shows.
        Returns the rows inserted."""
        cur = self.cur
        batch = self.p["batch_rows"]
        cur.execute("SELECT current_setting('server_version_num')::int, c.relkind,"
                    " pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::bigint"
                    " FROM pg_catalog.pg_class c WHERE c.oid = %s::regclass", (rel.as_string(cur),))
        version, relkind, blocks = cur.fetchone()
        if batch <= 0 or todo < batch or version < 140000 or relkind != "r" or blocks < 2:
            self.q(sql.SQL("/* dedup-rollout restore: 0 of {} rows put back */ ").format(sql.SQL(str(int(todo))))
                   + insert + missing + order)
            return cur.rowcount
        step = max(1, -(-blocks * batch // max(todo, 1)))  # blocks per slice, about batch_rows rows each
        done = 0
        for start in range(0, blocks, step):
            last = start + step >= blocks
            rng = sql.SQL(" AND s.ctid >= {}::tid").format(sql.Literal("(%d,0)" % start))
            if not last:  # the last slice is open-ended: rows on blocks added since the size was read count too
                rng += sql.SQL(" AND s.ctid < {}::tid").format(sql.Literal("(%d,0)" % (start + step)))
            note = sql.SQL("/* dedup-rollout restore: {} of {} rows put back */ ").format(
                sql.SQL(str(int(done))), sql.SQL(str(int(todo))))
            self.q(note + insert + missing + rng + order)
            done += cur.rowcount
        return done

    def attempt(self, conn, info, source, entry):
        p = self.p
        check = self.module.check_mode
        cur = self.cur
        target = qualified(p["schema"], p["table"])
        self.q("SET LOCAL lock_timeout = %s", (p["lock_timeout"],))
        ledger_status = self.ledger.table_status(cur, p["run_id"], p["schema"], p["table"])
        out = {"source": source, "restored": 0, "present": 0, "source_rows": 0, "ledger_marked": False}
        if source == "table":
            rel = qualified(p["backup_schema"], p["backup_table"])
            cur.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(rel))
            cols = [d[0] for d in cur.description]
            self.q(sql.SQL("SELECT count(*) FROM {}").format(rel))
            out["source_rows"] = cur.fetchone()[0]
        elif source == "dump":
            staging_schema = None if check else p["staging_schema"]
            if staging_schema is not None:
                self.q(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(staging_schema)))
                self.q(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(staging_schema)))
            rel, cols, out["source_rows"] = self.load_dump(conn, info, entry, staging_schema)
            expected = p["rows_removed"]
            if expected is not None and out["source_rows"] != expected and not p["allow_incomplete"]:
                raise DedupPgError(
                    "the dump %s holds %d of the %d rows the deploy removed from %s.%s (rows written between the "
                    "dump and the migration, e.g. in online mode, are not in it). Nothing was restored for this "
                    "table. Set restore_allow_incomplete=true to put back the %d rows the dump has."
                    % (p["dump_path"], out["source_rows"], expected, p["schema"], p["table"], out["source_rows"]))
        else:
            rel, cols = None, []
        if rel is not None:
            insert_cols = [c["name"] for c in info["columns"] if not c["generated"] and c["name"] in cols]
            col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in insert_cols)
            pk = info["primary_key"]
            only = sql.SQL("" if info["partitioned"] else "ONLY ")  # a partitioned table: through its parent
            if not check:
                self.q(sql.SQL("LOCK TABLE {}{} IN SHARE ROW EXCLUSIVE MODE").format(only, target))
            if pk:
                match = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(c)) for c in pk)
                missing = sql.SQL(
                    "FROM {rel} s WHERE NOT EXISTS (SELECT 1 FROM {only}{target} t WHERE {match})").format(
                    rel=rel, only=only, target=target, match=match)
                order = sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c))
                                                                           for c in pk))
            else:
                # No primary key: the ledger status (changed in this same transaction) says whether it was done.
                missing = sql.SQL("FROM {rel} s WHERE {todo}").format(
                    rel=rel, todo=sql.Literal(ledger_status != "rolled_back"))
                order = sql.SQL("")
            self.q(sql.SQL("SELECT count(*) ") + missing)
            todo = cur.fetchone()[0]
            out["present"] = out["source_rows"] - todo
            if todo and not check:
                triggers = [t for t in info["triggers"] if t["enabled"] in ("O", "A", "R")]
                for t in triggers:
                    self.q(sql.SQL("ALTER TABLE {}{} DISABLE TRIGGER {}").format(only, target,
                                                                                  sql.Identifier(t["name"])))
                overriding = sql.SQL(" OVERRIDING SYSTEM VALUE") if any(
                    c["identity"] == "a" and c["name"] in insert_cols for c in info["columns"]) else sql.SQL("")
                insert = sql.SQL("INSERT INTO {target} ({cols}){ov} SELECT {scols} ").format(
                    target=target, cols=col_ids, ov=overriding,
                    scols=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in insert_cols))
                todo = self.insert_in_batches(rel, insert, missing, order, todo)
                for t in triggers:
                    mode = {"O": "", "A": "ALWAYS ", "R": "REPLICA "}[t["enabled"]]
                    self.q(sql.SQL("ALTER TABLE {}{} ENABLE {}TRIGGER {}").format(
                        only, target, sql.SQL(mode), sql.Identifier(t["name"])))
            out["restored"] = todo
            if source == "dump" and not check:
                self.q(sql.SQL("DROP TABLE {}").format(rel))
        if ledger_status is not None and ledger_status != "rolled_back":
            out["ledger_marked"] = True
            if not check:
                self.ledger.mark_rolled_back(cur, p["run_id"], p["schema"], p["table"])
        return out

    def run(self):
        p = self.p
        m = self.module
        for name, what in ((p["schema"], "schema"), (p["table"], "table"), (p["backup_schema"], "backup schema"),
                           (p["staging_schema"], "staging schema")):
            validate_identifier(name, what, m)
        if p["backup_table"]:
            validate_identifier(p["backup_table"], "backup table", m)
        conn = connect(m, autocommit=False, application_name="pg_restore_rows")
        self.cur = conn.cursor()
        try:
            info = get_table(self.cur, p["schema"], p["table"], m)
            check_columns(info, p["natural_key"], m, "natural-key column")
            if p["rows_removed"] == 0:
                source, n, entry = "none", 0, None
            else:
                source, n, entry = self.choose_source(self.cur)
            conn.rollback()
            if p["verify_only"]:
                return dict(changed=False, source=source, source_rows=n if n is not None else -1, restored=0,
                            present=0, ledger_marked=False, attempts=0, queries=[])

            def one(_number):
                self.queries = []
                result = self.attempt(conn, info, source, entry)
                if m.check_mode:
                    conn.rollback()
                else:
                    conn.commit()
                return result

            where = "%s.%s" % (p["schema"], p["table"])
            try:
                out, attempts = with_lock_retries(conn, one, p["retries"], p["retry_delay"],
                                                  watch=PlayWatch(p["run_lock_id"] or None, every=0))
            except PlayGone as gone:
                raise DedupPgError("the play that started the restore of %s is gone; stopped after %d attempt(s) "
                                   "that could not get their locks, nothing was restored for this table"
                                   % (where, gone.attempts)) from gone
            except LockRetriesExhausted as exc:
                holders = sessions_in_the_way(conn, info["oid"])
                raise DedupPgError(lock_failure_message(
                    where, exc.attempts, error_text(exc.error, m), holders, lock_timeout=p["lock_timeout"],
                    delay=p["retry_delay"], outcome="nothing was restored for this table",
                    advice="They must finish first (or be ended); then re-run the rollback.")) from exc
            changed = out["restored"] > 0 or out["ledger_marked"]
            return dict(changed=changed, attempts=attempts, queries=self.queries, **out)
        except Exception:
            conn.rollback()
            raise
        finally:
            conn.close()


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
        rows_removed=dict(type="int"),
        source=dict(type="str", default="auto", choices=["auto", "table", "dump"]),
        dump_path=dict(type="path"),
        pg_restore=dict(type="str", default="pg_restore"),
        staging_schema=dict(type="str", default="dedup_rollout_staging"),
        allow_incomplete=dict(type="bool", default=False),
        verify_only=dict(type="bool", default=False),
        lock_timeout=dict(type="str", default="5s"),
        retries=dict(type="int", default=5),
        retry_delay=dict(type="float", default=3),
        batch_rows=dict(type="int", default=100000),
        run_lock_id=dict(type="str", default=""),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        module.exit_json(**Restorer(module).run())
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="restoring %s.%s failed: %s" % (module.params["schema"], module.params["table"],
                                                              error_text(exc, module)),
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
