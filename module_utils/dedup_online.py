# -*- coding: utf-8 -*-
"""Online deduplication of one table while its writers keep running (used by library/pg_online_dedup.py).

The steps, each idempotent, so that a re-run after an interruption finds the state in the catalog and
continues:

1. backup    the owner-only backup table (LIKE the table) and the table's ledger row (status
             deduplicated, strategy online, rows_removed counted up batch by batch);
2. helper    a plain index on the natural key, built CONCURRENTLY, so the guard's look-ups are cheap;
3. guard     a BEFORE INSERT / BEFORE UPDATE OF <key> trigger: an INSERT whose key already exists is
             skipped (what the old ETL's ON CONFLICT DO NOTHING does once the constraint exists); an UPDATE
             that would move a row onto an existing key fails with unique_violation (what the constraint
             will do). New keys are serialised with pg_advisory_xact_lock(class, bucket), the bucket a hash
             of the key modulo ``lock_buckets``: never one lock per key;
4. keep-set  read from a snapshot (no lock beyond ACCESS SHARE): per duplicated key, the row to keep;
5. batches   at most ``batch_rows`` rows per transaction: DELETE ... RETURNING into the backup table and
             the ledger counter, in the same transaction; a pause between batches; plain VACUUM now and
             then;
6. index     CREATE UNIQUE INDEX CONCURRENTLY under the constraint's name and
7. attach    ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX with DROP TRIGGER in the same transaction,
             under a short lock_timeout, retried: both by the constraint code that pg_unique_constraint uses
             (module_utils/dedup_constraint.py), the trigger's drop passed as ``attach_with``;
8. cleanup   guard function and helper index dropped; VACUUM (ANALYZE); pg_repack when the server has it.

All SQL is composed with psycopg2.sql.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from ansible.module_utils.dedup_constraint import Failed, UniqueConstraint, pick_equivalent
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
    conn_params,
    find_equivalent_unique,
    fit_name,
    get_table,
    qualified,
    server_version_num,
)

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover
    psycopg2 = None
    sql = None

# Advisory lock class of the guard (pg_advisory_xact_lock(int, int) form; never collides with the run
# lock of pg_run_lock, which uses the single-bigint form). 0x64647570 = "ddup".
GUARD_LOCK_CLASS = 1684305264
GUARD_TRIGGER = "zz_dedup_rollout_guard"   # fires after the table's own BEFORE triggers (name order)
DOLLAR_TAG = "$dedup_guard$"
UNIQUE_VIOLATION = "23505"


def constraint_name(table, columns):
    """The default name pg_unique_constraint gives (so constraints.yml finds ours)."""
    return fit_name("_".join([table, *columns, "key"]))


def guard_function_name(schema, table):
    return fit_name("online_guard__%s__%s" % (schema, table))


def helper_index_name(table):
    return fit_name("%s_dedup_online_idx" % table)


class OnlineDedup:
    """One table. ``p`` is the module's params; ``log`` collects executed statements."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.queries = []
        self._seen = set()
        self.conn = None
        self.result = {"steps": [], "batches": 0, "rows_removed": 0, "lock_attempts": 0,
                       "longest_batch_seconds": 0.0, "longest_lock_seconds": 0.0, "vacuums": 0,
                       "repacked": False}
        self.play = PlayWatch(self.p.get("run_lock_id"))

    def gone_message(self, what):
        return ("the play that started the online deduplication is gone (killed?); stopped before %s after %d "
                "batch(es) and %d removed row(s), each committed together with its backup copy. Re-run "
                "deploy_dedup.yml to resume." % (what, self.result["batches"], self.result["rows_removed"]))

    def check_play(self, what):
        """Stop (between two transactions) once the play that started this module is gone."""
        if play_gone(self.conn, self.play):
            raise DedupPgError(self.gone_message(what))

    # ------------------------------------------------------------------ plumbing
    def _text(self, stmt):
        return stmt.as_string(self.conn) if hasattr(stmt, "as_string") else str(stmt)

    def _log(self, stmt):
        text = self._text(stmt)
        if text not in self._seen:
            self._seen.add(text)
            self.queries.append(text)

    def execute(self, cur, stmt, params=None):
        self._log(stmt)
        cur.execute(stmt, params)

    def one(self, stmt, params=None):
        with self.conn.cursor() as cur:
            cur.execute(stmt, params)
            return cur.fetchone()

    def step(self, name, seconds, **kw):
        self.result["steps"].append(dict(step=name, seconds=round(seconds, 3), **kw))

    def set_session(self, cur, lock_timeout="0", statement_timeout="0"):
        cur.execute("SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                    (lock_timeout, statement_timeout))

    def with_retries(self, attempt, what):
        """``attempt(cur)`` in one transaction under the short lock_timeout, retried on lock timeouts and deadlocks
        (module_utils/dedup_locks.py), stopping between two attempts once the play is gone. Returns (result,
        attempts); out of attempts a DedupPgError names the sessions in the way."""
        p = self.p

        def one(_number):
            self.result["lock_attempts"] += 1
            self.conn.autocommit = False
            try:
                with self.conn.cursor() as cur:
                    out = attempt(cur)
                self.conn.commit()
            finally:
                if not self.conn.closed and self.conn.status == psycopg2.extensions.STATUS_READY:
                    self.conn.autocommit = True
            return out

        try:
            return with_lock_retries(self.conn, one, p["retries"], p["retry_delay"], watch=self.play)
        except PlayGone as gone:
            raise DedupPgError(self.gone_message("%s (after %d attempt(s) that could not get their locks)"
                                                 % (what, gone.attempts))) from gone
        except LockRetriesExhausted as exc:
            holders = sessions_in_the_way(self.conn, self.info["oid"])
            raise DedupPgError(lock_failure_message(
                "%s.%s for %s" % (p["schema"], p["table"], what), exc.attempts, exc.error, holders,
                lock_timeout=p["lock_timeout"], delay=p["retry_delay"],
                outcome="nothing of it was applied and writers were never queued longer than lock_timeout",
                advice="Re-run later: the run resumes here.")) from exc
        finally:
            if not self.conn.closed:
                self.conn.autocommit = True

    def short_transaction(self, statements, what):
        """Run statements in one transaction under the short lock_timeout; retried (with_retries)."""
        p = self.p

        def attempt(cur):
            t0 = time.monotonic()
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (p["lock_timeout"],))
            for stmt in statements:
                self.execute(cur, stmt)
            return t0

        t0, attempts = self.with_retries(attempt, what)
        self.result["longest_lock_seconds"] = max(self.result["longest_lock_seconds"],
                                                  round(time.monotonic() - t0, 3))
        return attempts

    # ------------------------------------------------------------------ catalog state
    def load(self):
        p = self.p
        with self.conn.cursor() as cur:
            self.version = server_version_num(cur)
            self.info = get_table(cur, p["schema"], p["table"], refuse_partitioned=True, refuse_inheritance=True)
        cols = {c["name"]: c for c in self.info["columns"]}
        for c in p["natural_key"]:
            if c not in cols:
                raise DedupPgError('natural-key column "%s" does not exist in %s.%s' % (c, p["schema"], p["table"]))
        pk = self.info["primary_key"]
        if len(pk) != 1:
            raise DedupPgError('%s.%s: online mode walks the table by a single-column primary key, and this table has '
                               '%s; use dedup_mode=offline for it' % (p["schema"], p["table"],
                                                                    "none" if not pk else "a composite one"))
        self.pk = pk[0]
        self.order_by = p["order_by"] or self.pk
        if self.order_by not in cols:
            raise DedupPgError('order_by column "%s" does not exist in %s.%s' % (self.order_by, p["schema"],
                                                                                p["table"]))
        self.nullable = {c: not cols[c]["not_null"] for c in p["natural_key"]}
        for name in [p["schema"], p["table"], *p["natural_key"], p["backup_schema"]]:
            if DOLLAR_TAG in name:
                raise DedupPgError("identifier %r contains %s" % (name, DOLLAR_TAG))
        self.tbl = qualified(p["schema"], p["table"])
        self.cname = p["constraint_name"] or constraint_name(p["table"], p["natural_key"])
        self.func = sql.Identifier(p["backup_schema"], guard_function_name(p["schema"], p["table"]))
        self.helper = helper_index_name(p["table"])
        self.backup = sql.Identifier(p["backup_schema"], p["backup_table"]) if p["backup_table"] else None
        # the table's ledger row: written (and listed in queries) in the transactions of the work it records
        self.ledger = Ledger(p["backup_schema"], execute=self.execute)

    def state(self):
        """What the catalog says about this table's online migration."""
        oid = self.info["oid"]
        with self.conn.cursor() as cur:
            found = find_equivalent_unique(cur, oid, self.p["natural_key"])
            cur.execute("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = %s AND tgname = %s",
                        (oid, GUARD_TRIGGER))
            trigger = cur.fetchone()[0] > 0
            cur.execute("SELECT to_regprocedure(%s) IS NOT NULL", (self._text(self.func) + "()",))
            function = cur.fetchone()[0]
            cur.execute(
                "SELECT ic.relname, i.indisvalid AND i.indisready FROM pg_catalog.pg_index i "
                "JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = %s AND ic.relname = ANY(%s)",
                (oid, [self.helper, self.cname]),
            )
            indexes = dict(cur.fetchall())
            backup = False
            if self.backup is not None:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (self._text(self.backup),))
                backup = cur.fetchone()[0]
        # our own index, built but not attached yet, is not the constraint: the constraint step attaches it
        constraint = pick_equivalent(found, [c for c, nullable in self.nullable.items() if nullable],
                                     bool(self.p["nulls_not_distinct"]), own_index=self.cname)
        return {"constraint": constraint, "trigger": trigger, "function": function, "backup": backup,
                "helper_index": indexes.get(self.helper), "unique_index": indexes.get(self.cname)}

    # ------------------------------------------------------------------ SQL pieces
    def _match(self, left, right_prefix):
        """left.k = right.k for every key column (NULLs equal when the column is nullable)."""
        parts = []
        for c in self.p["natural_key"]:
            lhs = sql.Identifier(left, c)
            rhs = sql.SQL(right_prefix) + sql.Identifier(c) if right_prefix.endswith(".") else sql.Identifier(
                right_prefix, c)
            if self.nullable[c]:
                parts.append(sql.SQL("({l} = {r} OR ({l} IS NULL AND {r} IS NULL))").format(l=lhs, r=rhs))
            else:
                parts.append(sql.SQL("{l} = {r}").format(l=lhs, r=rhs))
        return sql.SQL(" AND ").join(parts)

    def _keys(self, prefix=None):
        if prefix and prefix.endswith("."):
            return sql.SQL(", ").join(sql.SQL(prefix) + sql.Identifier(c) for c in self.p["natural_key"])
        if prefix:
            return sql.SQL(", ").join(sql.Identifier(prefix, c) for c in self.p["natural_key"])
        return sql.SQL(", ").join(map(sql.Identifier, self.p["natural_key"]))

    def guard_function_sql(self):
        p = self.p
        buckets = sql.Literal(int(p["lock_buckets"]))
        return sql.SQL(
            "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS $dedup_guard$\n"
            "-- dedup-rollout online guard for {tname}: no new duplicate of ({kname}) while it is deduplicated.\n"
            "BEGIN\n"
            "    IF TG_OP = 'UPDATE' THEN\n"
            "        IF ROW({new}) IS NOT DISTINCT FROM ROW({old}) THEN\n"
            "            RETURN NEW;\n"
            "        END IF;\n"
            "    ELSIF EXISTS (SELECT 1 FROM ONLY {tbl} x WHERE {match}) THEN\n"
            "        RETURN NULL;  -- key present (committed): skip, as ON CONFLICT DO NOTHING will\n"
            "    END IF;\n"
            "    -- a new key: serialise its writers on one of {buckets} buckets, then look again\n"
            "    PERFORM pg_catalog.pg_advisory_xact_lock({cls}, pg_catalog.mod(pg_catalog.mod(\n"
            "        pg_catalog.hashtextextended(ROW({new})::text, {seed}), {buckets}) + {buckets}, {buckets})::int);\n"
            "    IF EXISTS (SELECT 1 FROM ONLY {tbl} x WHERE {match}) THEN\n"
            "        IF TG_OP = 'INSERT' THEN\n"
            "            RETURN NULL;\n"
            "        END IF;\n"
            "        RAISE EXCEPTION USING ERRCODE = 'unique_violation',\n"
            "            MESSAGE = {msg}, DETAIL = 'Key (' || ROW({new})::text || ') already exists.';\n"
            "    END IF;\n"
            "    RETURN NEW;\n"
            "END\n"
            "$dedup_guard$"
        ).format(
            func=self.func, tname=sql.SQL(self._text(self.tbl).replace("\n", " ")),
            kname=sql.SQL(", ".join(p["natural_key"])),
            new=self._keys("NEW."), old=self._keys("OLD."), tbl=self.tbl, match=self._match("x", "NEW."),
            buckets=buckets, cls=sql.Literal(GUARD_LOCK_CLASS), seed=sql.Literal(int(self.info["oid"])),
            msg=sql.Literal("duplicate key value violates the dedup-rollout guard of %s.%s" % (p["schema"],
                                                                                             p["table"])),
        )

    def guard_trigger_sql(self):
        execute = "FUNCTION" if self.version >= 110000 else "PROCEDURE"
        return sql.SQL("CREATE TRIGGER {trg} BEFORE INSERT OR UPDATE OF {keys} ON {tbl} FOR EACH ROW "
                       "EXECUTE {kw} {func}()").format(trg=sql.Identifier(GUARD_TRIGGER), keys=self._keys(),
                                                       tbl=self.tbl, kw=sql.SQL(execute), func=self.func)

    # ------------------------------------------------------------------ steps
    def ensure_backup(self):
        p = self.p
        t0 = time.monotonic()
        stmts = []
        if self.backup is not None:
            stmts.append(sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {})").format(self.backup, self.tbl))
            stmts.append(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(self.backup))
            # Owner-only even when ALTER DEFAULT PRIVILEGES grants new tables to readers (as offline mode's
            # dedup_acl block in sql/migrate_table.sql.j2): every grantee but the owner is revoked.
            stmts.append(sql.SQL(
                "DO $dedup_acl$ DECLARE g regrole; BEGIN "
                "FOR g IN SELECT DISTINCT a.grantee::regrole FROM pg_catalog.pg_class c, "
                "pg_catalog.aclexplode(c.relacl) a WHERE c.oid = {rel}::regclass AND a.grantee NOT IN (0, c.relowner) "
                "LOOP EXECUTE format('REVOKE ALL ON %s FROM %s', {rel}::regclass, g); END LOOP; END $dedup_acl$"
            ).format(rel=sql.Literal(self._text(self.backup))))
        self.conn.autocommit = False
        with self.conn.cursor() as cur:
            if not Ledger(p["backup_schema"]).exists(cur):
                self.conn.rollback()
                self.conn.autocommit = True
                raise DedupPgError("the ledger %s does not exist: the backup role creates it (run deploy_dedup.yml)"
                                   % self.ledger.name("table_runs"))
            for stmt in stmts:
                self.execute(cur, stmt)
            self.ledger.start_table(cur, p["run_id"], p["schema"], p["table"], p["natural_key"], p["keep"],
                                    self.order_by, "deduplicated", size_of=self._text(self.tbl), if_absent=True,
                                    strategy="online", backup_mode=p["backup_mode"], backup_table=p["backup_table"],
                                    rows_removed=0)
        self.conn.commit()
        self.conn.autocommit = True
        self.step("backup_table", time.monotonic() - t0)

    def build_helper_index(self):
        """CREATE INDEX CONCURRENTLY of the guard's look-ups; an INVALID leftover of the same name is dropped
        first."""
        t0 = time.monotonic()
        name = self.helper
        drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified(self.p["schema"], name))
        create = sql.SQL("CREATE INDEX CONCURRENTLY {name} ON {tbl} ({cols})").format(
            name=sql.Identifier(name), tbl=self.tbl, cols=self._keys())
        with self.conn.cursor() as cur:
            # waits for older transactions without blocking writers: no lock_timeout here
            self.set_session(cur, "0", "0")
            self.execute(cur, drop)
            try:
                self.execute(cur, sql.SQL("SET maintenance_work_mem = {}").format(
                    sql.Literal(self.p["maintenance_work_mem"])))
                self.execute(cur, create)
            except psycopg2.Error:
                cur.execute(drop)
                raise
        self.step("helper_index", time.monotonic() - t0)

    def ensure_guard(self, st):
        t0 = time.monotonic()
        stmts = [self.guard_function_sql(),
                 sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(self.func)]
        if not st["trigger"]:
            stmts.append(self.guard_trigger_sql())
        attempts = self.short_transaction(stmts, "installing the guard trigger")
        self.step("guard", time.monotonic() - t0, attempts=attempts)

    def build_keep(self):
        """Per duplicated key, the row to keep; read from one snapshot, no lock beyond ACCESS SHARE."""
        p = self.p
        t0 = time.monotonic()
        keep = sql.Identifier("dedup_online_keep")
        pk = sql.Identifier(self.pk)
        if self.order_by == self.pk:
            select = sql.SQL(
                "SELECT {agg}({pk}) AS dedup_keep_id, {keys} FROM ONLY {tbl} GROUP BY {keys} HAVING count(*) > 1"
            ).format(agg=sql.SQL("min" if p["keep"] == "oldest" else "max"), pk=pk, keys=self._keys(), tbl=self.tbl)
        else:
            direction = sql.SQL("ASC" if p["keep"] == "oldest" else "DESC")
            select = sql.SQL(
                "SELECT dedup_keep_id, {keys} FROM (SELECT DISTINCT ON ({keys}) {pk} AS dedup_keep_id, {keys}, "
                "count(*) OVER (PARTITION BY {keys}) AS dedup_n FROM ONLY {tbl} "
                "ORDER BY {keys}, {order} {dir}, {pk} {dir}) d WHERE dedup_n > 1"
            ).format(keys=self._keys(), pk=pk, tbl=self.tbl, order=sql.Identifier(self.order_by), dir=direction)
        self.conn.autocommit = False
        self.conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT set_config('work_mem', %s, true)", (p["work_mem"],))
                self.execute(cur, sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(keep))
                self.execute(cur, sql.SQL("CREATE TEMP TABLE {} AS ").format(keep) + select)
                self.execute(cur, sql.SQL("SELECT count(*), max({pk}) FROM ONLY {tbl}").format(pk=pk, tbl=self.tbl))
                rows_now, max_id = cur.fetchone()
                self.execute(cur, sql.SQL("CREATE INDEX ON {} ({})").format(keep, self._keys()))
                self.execute(cur, sql.SQL("ANALYZE {}").format(keep))
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(keep))
                groups = cur.fetchone()[0]
            self.conn.commit()
        finally:
            self.conn.autocommit = True
            self.conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_DEFAULT
        self.step("keep_set", time.monotonic() - t0, rows=rows_now, duplicated_keys=groups)
        return rows_now, max_id, groups

    def delete_batches(self, max_id):
        """Remove the duplicates in pk windows of at most batch_rows rows, each window one transaction."""
        p = self.p
        t0 = time.monotonic()
        pk = sql.Identifier(self.pk)
        # %(lo)s is NULL for the first window (the planner folds "NULL IS NULL OR ..." away)
        after = sql.SQL("(%(lo)s IS NULL OR {x}{pk} > %(lo)s)")
        window = sql.SQL(
            "SELECT max(w.{pk}) FROM (SELECT {pk} FROM ONLY {tbl} WHERE {after} AND {pk} <= %(hi)s "
            "ORDER BY {pk} LIMIT %(n)s) w").format(pk=pk, tbl=self.tbl, after=after.format(x=sql.SQL(""), pk=pk))
        delete = sql.SQL(
            "DELETE FROM ONLY {tbl} x USING pg_temp.dedup_online_keep k "
            "WHERE {after} AND x.{pk} <= %(whi)s AND {match} AND x.{pk} <> k.dedup_keep_id "
            "AND EXISTS (SELECT 1 FROM ONLY {tbl} y WHERE y.{pk} = k.dedup_keep_id) RETURNING x.*"
        ).format(tbl=self.tbl, pk=pk, match=self._match("x", "k"), after=after.format(x=sql.SQL("x."), pk=pk))
        if self.backup is not None:
            stmt = sql.SQL("WITH gone AS ({delete}) INSERT INTO {backup} SELECT * FROM gone").format(
                delete=delete, backup=self.backup)
        else:
            stmt = delete
        if max_id is None:
            return
        lo = None
        removed = batches = 0
        while True:
            self.check_play("the next batch")
            with self.conn.cursor() as cur:
                self.execute(cur, window, {"lo": lo, "hi": max_id, "n": int(p["batch_rows"])})
                whi = cur.fetchone()[0]
            if whi is None:
                break
            b0 = time.monotonic()
            removed += self.batch(stmt, lo, whi)
            self.result["longest_batch_seconds"] = max(self.result["longest_batch_seconds"],
                                                       round(time.monotonic() - b0, 3))
            batches += 1
            lo = whi
            if p["vacuum_every"] and batches % int(p["vacuum_every"]) == 0:
                self.vacuum(analyze=False)
            if p["batch_pause"]:
                time.sleep(float(p["batch_pause"]))
        self.result["batches"] += batches
        self.result["rows_removed"] += removed
        self.step("batches", time.monotonic() - t0, batches=batches, rows_removed=removed)

    def batch(self, stmt, lo, whi):
        """One window: delete + backup copy + ledger counter in one transaction (retried on lock timeouts)."""
        p = self.p

        def attempt(cur):
            cur.execute("SELECT set_config('lock_timeout', %s, true), set_config('work_mem', %s, true)",
                        (p["lock_timeout"], p["work_mem"]))
            self.execute(cur, stmt, {"lo": lo, "whi": whi})
            n = max(cur.rowcount, 0)
            if n:
                self.ledger.add_removed(cur, p["run_id"], p["schema"], p["table"], n)
            return n

        return self.with_retries(attempt, "a batch of its duplicate rows")[0]

    def vacuum(self, analyze):
        t0 = time.monotonic()
        with self.conn.cursor() as cur:
            self.set_session(cur, "0", "0")
            self.execute(cur, sql.SQL("VACUUM {}{}").format(sql.SQL("(ANALYZE) " if analyze else ""), self.tbl))
        self.result["vacuums"] += 1
        self.result["vacuum_seconds"] = round(self.result.get("vacuum_seconds", 0.0) + time.monotonic() - t0, 3)

    def ensure_constraint(self):
        """The UNIQUE constraint by the constraint code (module_utils/dedup_constraint.py): its index built
        CONCURRENTLY (waiting for older transactions without a lock_timeout, never blocking writers), then attached
        under the short lock_timeout, retried, with the guard trigger dropped in the attach's own transaction. A
        valid index of ours left by an interrupted run is attached as it is. Raises Failed (``pgcode`` 23505 when a
        duplicate got in during the build)."""
        p = self.p
        drop_guard = sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(GUARD_TRIGGER), self.tbl)
        spec = {"schema": p["schema"], "table": p["table"], "columns": list(p["natural_key"]), "name": self.cname,
                "nulls_not_distinct": bool(p["nulls_not_distinct"])}
        options = {"state": "present", "concurrently": True, "lock_timeout": p["lock_timeout"],
                   "statement_timeout": "0", "retries": p["retries"], "retry_delay": p["retry_delay"],
                   "index_lock_timeout": "0", "maintenance_work_mem": p["maintenance_work_mem"],
                   "check_duplicates": False, "attach_with": [drop_guard], "caller": "pg_online_dedup"}
        uc = UniqueConstraint(self.module, spec, conn=self.conn, watch=self.play, version=self.version,
                              options=options)
        try:
            out = uc.run()
        finally:
            self.queries.extend(uc.queries)
            self.result["lock_attempts"] += uc.timings["attempts"]
            if uc.timings["index_seconds"] is not None:
                self.step("unique_index", uc.timings["index_seconds"])
            if uc.timings["attach_seconds"] is not None:
                self.result["longest_lock_seconds"] = max(self.result["longest_lock_seconds"],
                                                          uc.timings["attach_seconds"])
                self.step("attach", uc.timings["attach_seconds"], attempts=uc.timings["attempts"])
        self.result["constraint_action"] = out["action"]
        return out

    def cleanup(self, st):
        """Guard trigger (only when a constraint exists), function, helper index: whatever is left."""
        t0 = time.monotonic()
        did = False
        if st["trigger"]:
            self.short_transaction([sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(GUARD_TRIGGER), self.tbl)], "dropping the guard trigger")
            did = True
        with self.conn.cursor() as cur:
            self.set_session(cur, self.p["lock_timeout"], "0")
            if st["function"] or st["trigger"]:
                self.execute(cur, sql.SQL("DROP FUNCTION IF EXISTS {}()").format(self.func))
                did = True
            if st["helper_index"] is not None:
                self.set_session(cur, "0", "0")
                self.execute(cur, sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                    qualified(self.p["schema"], self.helper)))
                did = True
        if did:
            self.step("cleanup", time.monotonic() - t0)
        return did

    def finish_ledger(self, rows_before):
        p = self.p
        with self.conn.cursor() as cur:
            row = self.ledger.finish_table(cur, p["run_id"], p["schema"], p["table"], rows_before, self.cname,
                                           self._text(self.tbl))
        if row:
            self.result["ledger"] = row

    # ------------------------------------------------------------------ space
    def sizes(self):
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT pg_catalog.pg_total_relation_size(c.oid), pg_catalog.pg_relation_size(c.oid), "
                "greatest(c.reltuples, 0)::bigint, "
                "(SELECT coalesce(sum(s.avg_width), 0) FROM pg_catalog.pg_stats s "
                " WHERE s.schemaname = %s AND s.tablename = %s) "
                "FROM pg_catalog.pg_class c WHERE c.oid = %s",
                (self.p["schema"], self.p["table"], self.info["oid"]))
            total, heap, tuples, width = cur.fetchone()
        # live heap estimate: tuples x (row width + 24-byte tuple header + 4-byte line pointer), pages 90% full
        live = int(tuples * (int(width) + 28) / 0.9)
        return {"total_bytes": total, "heap_bytes": heap, "live_rows_estimate": tuples,
                "heap_bloat_bytes_estimate": max(0, heap - live)}

    def repack_available(self):
        """(extension version, client path, why not) for pg_repack: the client must match the extension.

        The client is looked up on PATH, then where Debian (/usr/lib/postgresql/<major>/bin) and the PGDG RPMs
        (/usr/pgsql-<major>/bin) put it, for the server's major version."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_repack'")
            row = cur.fetchone()
            cur.execute("SELECT current_setting('server_version_num')::int / 10000")
            major = cur.fetchone()[0]
        ext = row[0] if row else None
        if not ext:
            return None, None, "the database has no pg_repack extension (CREATE EXTENSION pg_repack)"
        candidates = [shutil.which("pg_repack"), "/usr/lib/postgresql/%d/bin/pg_repack" % major,
                      "/usr/pgsql-%d/bin/pg_repack" % major]
        found = []
        for binary in [c for c in candidates if c and os.access(c, os.X_OK)]:
            try:
                out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            version = (out.split() or ["?", "?"])[-1]
            if version == ext:
                return ext, binary, None
            found.append("%s is %s" % (binary, version))
        if found:
            return ext, None, "no pg_repack client of the extension's version %s (%s)" % (ext, "; ".join(found))
        return ext, None, "no pg_repack client on the db host (install postgresql-%d-repack)" % major

    def repack(self):
        """pg_repack the table (short ACCESS EXCLUSIVE at both ends; gives up instead of killing sessions)."""
        p = self.p
        if p["repack"] == "never":
            self.result["repack_skipped"] = "migrate_online_repack is never"
            return False
        ext, binary, why_not = self.repack_available()
        self.result["repack_extension"] = ext
        self.result["repack_binary"] = binary
        if why_not:
            self.result["repack_skipped"] = why_not
            return False
        kw = conn_params(p)
        env = dict(os.environ)
        if kw.get("password"):
            env["PGPASSWORD"] = kw["password"]
        cmd = [binary, "--no-kill-backend", "--wait-timeout", str(int(p["repack_wait_timeout"])),
               "--table", sql.Identifier(p["schema"], p["table"]).as_string(self.conn),
               "--dbname", kw.get("dbname", "")]
        if kw.get("host"):
            cmd += ["--host", kw["host"]]
        if kw.get("port"):
            cmd += ["--port", str(kw["port"])]
        if kw.get("user"):
            cmd += ["--username", kw["user"]]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        self.step("pg_repack", time.monotonic() - t0, rc=proc.returncode)
        self.queries.append(" ".join(cmd))
        if proc.returncode != 0:
            self.module.warn("pg_repack of %s.%s failed (rc=%d): %s; the table keeps its bloat (see sizes)"
                             % (p["schema"], p["table"], proc.returncode, (proc.stderr or proc.stdout).strip()[-500:]))
            return False
        return True

    # ------------------------------------------------------------------ the whole table
    def run(self, connect):
        p = self.p
        started = time.monotonic()
        self.conn = connect()
        self.conn.autocommit = True
        try:
            self.load()
            st = self.state()
            self.result.update(constraint_name=self.cname, guard_trigger=GUARD_TRIGGER,
                               guard_function=self._text(self.func), helper_index=self.helper,
                               state_before={k: (v is not None and v is not False) if k != "constraint" else
                                             (v["name"] if v else None) for k, v in st.items()})
            if st["constraint"] is not None:
                # done (or never needed): only leftovers of an interrupted run are removed
                leftovers = st["trigger"] or st["function"] or st["helper_index"] is not None
                self.result.update(constraint_name=st["constraint"]["name"], action="none" if not leftovers
                                   else "cleanup")
                if leftovers and not self.module.check_mode:
                    self.cleanup(st)
                return dict(changed=bool(leftovers), **self._out(started))
            if self.module.check_mode:
                self.result["action"] = "would_deduplicate_online"
                return dict(changed=True, **self._out(started))
            self.result["size_before"] = self.sizes()
            self.ensure_backup()
            if st["helper_index"] is not True:
                self.build_helper_index()
            self.ensure_guard(st)
            rows_before = None
            for attempt in range(2):
                st = self.state()
                if st["unique_index"] is not True:
                    rows_now, max_id, _groups = self.build_keep()
                    rows_before = rows_now if rows_before is None else rows_before
                    self.delete_batches(max_id)
                    self.vacuum(analyze=True)
                self.check_play("building the unique index" if st["unique_index"] is not True
                                else "attaching the constraint")
                try:
                    self.ensure_constraint()
                except Failed as exc:
                    if exc.pgcode == UNIQUE_VIOLATION and attempt == 0:
                        self.module.warn("a duplicate got in during the build of the unique index of %s.%s "
                                         "(a writer outside READ COMMITTED?); deduplicating once more"
                                         % (p["schema"], p["table"]))
                        continue
                    raise DedupPgError(exc.msg) from None
                break
            self.cleanup(self.state())
            self.finish_ledger(rows_before)
            self.result["repacked"] = self.repack()
            if not self.result["repacked"]:
                self.vacuum(analyze=False)
            self.result["size_after"] = self.sizes()
            self.result["action"] = "deduplicated_online"
            return dict(changed=True, **self._out(started))
        finally:
            self.conn.close()

    def _out(self, started):
        out = {k: v for k, v in self.result.items() if not k.startswith("_")}
        out["queries"] = self.queries
        out["seconds"] = round(time.monotonic() - started, 3)
        return out
