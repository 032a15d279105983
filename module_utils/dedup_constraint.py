# -*- coding: utf-8 -*-
"""A table's UNIQUE constraint, once for every caller: library/pg_unique_constraint.py (the constraint step,
single and list mode) and the online path (module_utils/dedup_online.py, which builds its constraint
CONCURRENTLY while the ETL writes and drops its guard trigger in the transaction of the attach).

``UniqueConstraint(module, spec, conn, watch, version, options)``
    ``spec``: schema, table, columns, name, nulls_not_distinct. ``options``: the module's parameters by default
    (state, concurrently, lock_timeout, statement_timeout, retries, retry_delay); a caller that is not
    pg_unique_constraint passes its own dict, with the extras below. ``run()`` returns the table's result dict or
    raises :class:`Failed`; nothing is left half done (an INVALID index of an interrupted concurrent build is
    dropped; a valid one of ours is attached by the next run).
``pick_equivalent(candidates, nullable, want_nnd, ...)``
    the one decision of what counts as "the constraint is there already" (by meaning, not by name).
``record_in_ledger`` / ``ensure_table``
    the constraint step's ledger row (status constrained) and the one-table driver of both module modes.

Extras of ``options`` (all optional): ``index_lock_timeout`` (lock_timeout of the concurrent build; ``"0"`` lets
it wait for older transactions without ever blocking writers), ``index_statement_timeout``,
``maintenance_work_mem`` (of the build), ``check_duplicates`` (false: skip the GROUP BY scan before the build, for
a caller that just deduplicated under a guard; the build itself still fails on a duplicate, with ``pgcode``
23505 in :class:`Failed`), ``attach_with`` (statements run in the attach's own transaction).
"""

from __future__ import annotations

import time

from ansible.module_utils.dedup_ledger import changed as ledger_changed
from ansible.module_utils.dedup_locks import (
    LockRetriesExhausted,
    PlayGone,
    lock_failure_message,
    play_gone,
    sessions_in_the_way,
    with_lock_retries,
)
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    check_columns,
    error_text,
    find_equivalent_unique,
    fit_name,
    get_table,
    psycopg2,
    qualified,
    server_version_num,
    sql,
    validate_identifier,
)

UNIQUE_VIOLATION = "23505"


class Failed(Exception):
    """One table could not be done: ``msg`` as the module reports it, ``extra`` more result keys; ``pgcode`` the
    SQLSTATE when a statement failed (23505: the build met a duplicate)."""

    def __init__(self, msg, **extra):
        super().__init__(msg)
        self.msg = msg
        self.extra = extra
        self.pgcode = None


def pick_equivalent(candidates, nullable, want_nnd, own_index=None, warn=None):
    """The usable UNIQUE constraint or index of ``candidates`` (find_equivalent_unique) that already enforces the key,
    or None. With nullable key columns and NULLS NOT DISTINCT wanted, one that treats NULLs as distinct does not
    count (``warn`` is told). ``own_index``: the name of our own index; as an index (built, not yet attached) it does
    not count here either - the caller attaches it."""
    for cand in candidates:
        if not cand["usable"]:
            continue
        if nullable and want_nnd and not cand["nulls_not_distinct"]:
            if warn is not None:
                warn("{} {} covers the same columns but treats NULLs as distinct; it does not count as equivalent to "
                     "the NULLS NOT DISTINCT constraint requested because key columns {} are nullable".format(
                         cand["type"], cand["name"], ", ".join(nullable)))
            continue
        if own_index is not None and cand["type"] == "index" and cand["index_name"] == own_index:
            continue
        return cand
    return None


class UniqueConstraint:
    """One table's constraint: ``spec`` holds schema, table, columns, name, nulls_not_distinct; the shared options
    (state, concurrently, lock_timeout, retries, ...) are the module's unless ``options`` is given. ``conn``
    (autocommit) is the caller's one connection; ``watch`` its PlayWatch. ``timings`` tells, after run(), the
    seconds of the index build and of the attach (or of the one ALTER TABLE) and the lock attempts made."""

    def __init__(self, module, spec, conn=None, watch=None, version=None, options=None):
        self.module = module
        self.spec = spec
        self.opts = dict(module.params if options is None else options)
        self.caller = self.opts.get("caller") or "pg_unique_constraint"
        self.timings = {"index_seconds": None, "attach_seconds": None, "attempts": 0}
        try:
            self.schema = validate_identifier(spec["schema"], "schema")
            self.table = validate_identifier(spec["table"], "table")
            if not spec["columns"]:
                raise Failed("columns must list at least one column")
            self.columns = [validate_identifier(c, "column") for c in spec["columns"]]
            default_name = fit_name("_".join([self.table, *self.columns, "key"]))
            self.name = validate_identifier(spec["name"] or default_name, "constraint")
        except DedupPgError as exc:
            raise Failed(str(exc)) from None
        self.queries = []
        self.conn = conn
        self.version = version
        self.watch = watch

    # ------------------------------------------------------------------ helpers
    def fail(self, msg, **kw):
        raise Failed(msg, **kw)

    def sqltext(self, query):
        return query.as_string(self.conn) if hasattr(query, "as_string") else str(query)

    def run_ddl(self, statements, in_transaction=True):
        """Run statements, each attempt with lock_timeout; retried on lock timeouts and deadlocks
        (module_utils/dedup_locks.py); fail naming the sessions in the way. Outside a transaction (the concurrent
        build) the options' index_lock_timeout, index_statement_timeout and maintenance_work_mem apply."""
        p = self.opts
        lock_timeout, statement_timeout = p["lock_timeout"], p["statement_timeout"]
        if not in_transaction:
            lock_timeout = p.get("index_lock_timeout") or lock_timeout
            statement_timeout = p.get("index_statement_timeout") or statement_timeout

        def attempt(_number):
            if in_transaction:
                self.conn.autocommit = False
                with self.conn.cursor() as cur:
                    cur.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
                    cur.execute("SELECT set_config('statement_timeout', %s, true)", (statement_timeout,))
                    for stmt in statements:
                        cur.execute(stmt)
                self.conn.commit()
                self.conn.autocommit = True
            else:
                self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("SELECT set_config('lock_timeout', %s, false)", (lock_timeout,))
                    cur.execute("SELECT set_config('statement_timeout', %s, false)", (statement_timeout,))
                    if p.get("maintenance_work_mem"):
                        cur.execute("SELECT set_config('maintenance_work_mem', %s, false)",
                                    (p["maintenance_work_mem"],))
                    try:
                        for stmt in statements:
                            cur.execute(stmt)
                    finally:
                        cur.execute("RESET lock_timeout; RESET statement_timeout; RESET maintenance_work_mem")

        def before_retry(_number, _exc):
            if not in_transaction:  # CREATE INDEX CONCURRENTLY leaves an INVALID index behind
                self.drop_invalid_leftover()

        where = f'table "{self.schema}"."{self.table}"'
        try:
            attempts = with_lock_retries(self.conn, attempt, p["retries"], p["retry_delay"], watch=self.watch,
                                         before_retry=before_retry)[1]
            self.timings["attempts"] += attempts
        except PlayGone as gone:
            self.conn.autocommit = True
            self.timings["attempts"] += gone.attempts
            self.fail(f"the play that started {self.caller} on {where} is gone; stopped after "
                      f"{gone.attempts} attempt(s) that could not get their locks, no DDL was applied")
        except LockRetriesExhausted as exc:
            holders = sessions_in_the_way(self.conn, self.info["oid"])
            self.conn.autocommit = True
            self.timings["attempts"] += exc.attempts
            self.fail(lock_failure_message(where, exc.attempts, error_text(exc.error, self.module), holders,
                                           lock_timeout=lock_timeout, delay=p["retry_delay"],
                                           outcome="no DDL was applied",
                                           advice="Stop them (or wait) and re-run."),
                      blocking=holders)
        self.queries.extend(self.sqltext(s) for s in statements)

    def invalid_leftover(self):
        """An INVALID index named like our constraint on this table (left by an interrupted build)."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT ic.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid "
                "WHERE i.indrelid = %s AND ic.relname = %s AND NOT (i.indisvalid AND i.indisready)",
                (self.info["oid"], self.name),
            )
            return cur.fetchone() is not None

    def drop_invalid_leftover(self):
        if self.invalid_leftover():
            stmt = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified(self.schema, self.name))
            self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (self.opts["lock_timeout"],))
                try:
                    cur.execute(stmt)
                finally:
                    cur.execute("RESET lock_timeout")
            self.queries.append(self.sqltext(stmt))
            return True
        return False

    def relation_named(self, name):
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT c.relkind, c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (self.schema, name),
            )
            return cur.fetchone()

    def constraint_named(self, name):
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT con.contype, pg_catalog.pg_get_constraintdef(con.oid), con.conrelid = %s "
                "FROM pg_catalog.pg_constraint con JOIN pg_catalog.pg_namespace n ON n.oid = con.connamespace "
                "WHERE n.nspname = %s AND con.conname = %s ORDER BY 3 DESC",
                (self.info["oid"], self.schema, name),
            )
            return cur.fetchone()

    def duplicates(self, nulls_not_distinct):
        """Duplicate groups as the constraint would see them: one scan, a few sample keys."""
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        where = sql.SQL("")
        if not nulls_not_distinct:
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(
                sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in self.columns)
        sample = sql.SQL("json_build_object({})").format(sql.SQL(", ").join(
            sql.SQL("{}, {}::text").format(sql.Literal(c), sql.Identifier(c)) for c in self.columns))
        query = sql.SQL(
            "SELECT count(*) OVER (), sum(n) OVER () - count(*) OVER (), k FROM ("
            "SELECT count(*) AS n, {sample} AS k FROM {tbl}{where} GROUP BY {cols} HAVING count(*) > 1) d "
            "ORDER BY n DESC LIMIT 5"
        ).format(sample=sample, tbl=qualified(self.schema, self.table), where=where, cols=cols)
        with self.conn.cursor() as cur:
            cur.execute(query)
            rows = cur.fetchall()
        if not rows:
            return {"groups": 0, "rows": 0, "samples": []}
        return {"groups": int(rows[0][0]), "rows": int(rows[0][1]), "samples": [r[2] for r in rows]}

    # ------------------------------------------------------------------ main logic
    def run(self):
        """The table's result dict; Failed when it cannot be done (nothing is left half done)."""
        m = self.module
        p = self.opts
        try:
            with self.conn.cursor() as cur:
                if self.version is None:
                    self.version = server_version_num(cur)
                self.info = get_table(cur, self.schema, self.table)
            check_columns(self.info, self.columns, what="column")
        except DedupPgError as exc:
            self.fail(str(exc))
        if self.spec["nulls_not_distinct"] and self.version < 150000:
            self.fail(f"nulls_not_distinct needs PostgreSQL 15 or later; this server is "
                      f"{self.version // 10000}.{self.version % 10000}")
        if self.info["partitioned"] and p["concurrently"] and p["state"] == "present":
            self.fail(f'"{self.schema}"."{self.table}" is a partitioned table: PostgreSQL cannot build its index '
                      "CONCURRENTLY; use concurrently: false (the key must include the partition key)")
        if self.info["inherited_by"] or self.info["inherits_from"] and not self.info["is_partition"]:
            m.warn(f'"{self.schema}"."{self.table}" takes part in table inheritance: a UNIQUE constraint only '
                   "covers the rows stored in this table itself, not its parents or children")
        if p["state"] == "absent":
            return self.absent()
        return self.present()

    def absent(self):
        m = self.module
        if not self.spec["name"]:
            self.fail("state=absent needs name: the constraint to drop (nothing is dropped by guess)")
        found = self.constraint_named(self.name)
        if found is None or not found[2]:
            return dict(changed=False, name=self.name, action="none", existing=None, queries=[],
                        nulls_not_distinct=bool(self.spec["nulls_not_distinct"]))
        contype, definition = found[0], found[1]
        if contype != "u":
            self.fail(f'constraint "{self.name}" on "{self.schema}"."{self.table}" is not a UNIQUE constraint '
                      f"({definition}); refusing to drop it")
        existing = {"name": self.name, "type": "constraint", "definition": definition, "valid": True}
        result = dict(changed=True, name=self.name, action="dropped", existing=existing, queries=[],
                      nulls_not_distinct="NULLS NOT DISTINCT" in definition)
        if m._diff:
            result["diff"] = {"before": f"{self.name}: {definition}\n", "after": ""}
        if m.check_mode:
            return result
        stmt = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            qualified(self.schema, self.table), sql.Identifier(self.name))
        self.run_ddl([stmt])
        result["queries"] = self.queries
        return result

    def attach(self, index, base):
        """Our own valid index (a concurrent build interrupted before the attach): make it the constraint."""
        m = self.module
        existing = {"name": self.name, "type": "index", "definition": index["index_definition"], "valid": True}
        result = dict(changed=True, name=self.name, action="attached_index", existing=existing, queries=[],
                      nulls_not_distinct=index["nulls_not_distinct"], **base)
        if m._diff:
            result["diff"] = {"before": "{}: {}\n".format(self.name, index["index_definition"]),
                              "after": f"{self.name}: UNIQUE USING INDEX {self.name}\n"}
        if m.check_mode:
            return result
        try:
            self.attach_index()
        except psycopg2.Error as exc:
            self.fail(f'attaching index "{self.name}" as a UNIQUE constraint failed: {error_text(exc, m)}')
        result["queries"] = self.queries
        return result

    def attach_index(self):
        """ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX, with the options' ``attach_with`` statements in the
        same transaction; first, when the play that started us is gone, stop (the valid index stays for a re-run)."""
        if self.watch is not None and play_gone(self.conn, self.watch):
            self.fail(f'the play that started {self.caller} on "{self.schema}"."{self.table}" is gone; stopped '
                      f'before attaching the valid index "{self.name}" as the constraint (a re-run attaches it)')
        t0 = time.monotonic()
        attach = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
            qualified(self.schema, self.table), sql.Identifier(self.name), sql.Identifier(self.name))
        self.run_ddl([attach, *self.opts.get("attach_with", ())])
        self.timings["attach_seconds"] = round(time.monotonic() - t0, 3)

    def present(self):
        m = self.module
        p = self.opts
        want_nnd = bool(self.spec["nulls_not_distinct"])
        nullable = [c["name"] for c in self.info["columns"] if c["name"] in self.columns and not c["not_null"]]
        with self.conn.cursor() as cur:
            candidates = find_equivalent_unique(cur, self.info["oid"], self.columns)
        equivalent = pick_equivalent(candidates, nullable, want_nnd, warn=m.warn)
        for cand in candidates:
            if not cand["usable"] and cand["index_name"] != self.name:
                m.warn("ignored unusable unique index {} (valid={}, partial={}, expression={}): {}".format(
                    cand["index_name"], cand["valid"], cand["partial"], cand["expression"], cand["index_definition"]))
        base = dict(nullable_columns=nullable, table=self.table, schema=self.schema, columns=self.columns)
        if equivalent is not None and equivalent["type"] == "index" and equivalent["index_name"] == self.name:
            return self.attach(equivalent, base)
        if equivalent is not None:
            existing = {k: equivalent[k] for k in ("name", "type", "definition", "valid", "index_name",
                                                   "nulls_not_distinct", "columns")}
            result = dict(changed=False, name=equivalent["name"], action="none", existing=existing, queries=[],
                          nulls_not_distinct=equivalent["nulls_not_distinct"], **base)
            if m._diff:
                text = "{}: {}\n".format(equivalent["name"], equivalent["definition"])
                result["diff"] = {"before": text, "after": text}
            return result

        leftover = self.invalid_leftover()
        clash = self.relation_named(self.name)
        if clash is not None and not leftover:
            self.fail(f'a relation named "{self.name}" already exists in schema "{self.schema}" and is not an '
                      f"equivalent UNIQUE constraint/index on {self.table}; choose another name")
        clash = self.constraint_named(self.name)
        if clash is not None:
            self.fail(f'a constraint named "{self.name}" already exists in schema "{self.schema}" ({clash[1]}) and '
                      "is not equivalent; choose another name")

        dups = self.duplicates(want_nnd) if p.get("check_duplicates", True) else {"groups": 0, "rows": 0,
                                                                                 "samples": []}
        base["duplicates"] = dups
        if dups["groups"]:
            msg = (f'"{self.schema}"."{self.table}" still has {dups["rows"]} duplicate rows in {dups["groups"]} '
                   f"groups over ({', '.join(self.columns)}); deduplicate first. Sample keys: {dups['samples']}")
            if not m.check_mode:
                self.fail(msg, duplicates=dups)
            m.warn("check mode: " + msg)

        nnd_sql = sql.SQL(" NULLS NOT DISTINCT") if want_nnd else sql.SQL("")
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        with self.conn.cursor() as cur:  # quoted the way pg_get_constraintdef quotes
            cur.execute("SELECT array_agg(quote_ident(c) ORDER BY o) FROM unnest(%s::text[]) WITH ORDINALITY u(c, o)",
                        (self.columns,))
            quoted = cur.fetchone()[0]
        definition = "UNIQUE{} ({})".format(" NULLS NOT DISTINCT" if want_nnd else "", ", ".join(quoted))
        if leftover:
            action = "rebuilt_invalid_index"
        elif p["concurrently"]:
            action = "created_concurrently"
        else:
            action = "created"
        existing = None
        for cand in candidates:
            if leftover and cand["index_name"] == self.name:
                existing = {"name": self.name, "type": "index", "definition": cand["index_definition"],
                            "valid": False}
        result = dict(changed=True, name=self.name, action=action, existing=existing, queries=[],
                      nulls_not_distinct=want_nnd, **base)
        if m._diff:
            result["diff"] = {"before": "", "after": f"{self.name}: {definition}\n"}
        if m.check_mode:
            return result

        tbl = qualified(self.schema, self.table)
        try:
            if p["concurrently"]:
                self.drop_invalid_leftover()
                create = sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({}){}").format(
                    sql.Identifier(self.name), tbl, cols, nnd_sql)
                t0 = time.monotonic()
                self.run_ddl([create], in_transaction=False)
                self.timings["index_seconds"] = round(time.monotonic() - t0, 3)
                self.attach_index()
            else:
                stmts = []
                if leftover:
                    stmts.append(sql.SQL("DROP INDEX IF EXISTS {}").format(qualified(self.schema, self.name)))
                stmts.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE{} ({})").format(
                    tbl, sql.Identifier(self.name), nnd_sql, cols))
                t0 = time.monotonic()
                self.run_ddl([*stmts, *self.opts.get("attach_with", ())])
                self.timings["attach_seconds"] = round(time.monotonic() - t0, 3)
        except psycopg2.Error as exc:
            if p["concurrently"]:
                try:
                    self.drop_invalid_leftover()
                except psycopg2.Error:
                    pass
            hint = ""
            if getattr(exc, "pgcode", None) == UNIQUE_VIOLATION:
                hint = " (duplicates appeared after the check: is the ETL still running?)"
            failure = Failed(f'adding UNIQUE ({", ".join(self.columns)}) to "{self.schema}"."{self.table}" '
                             f"failed{hint}: {error_text(exc, m)}")
            failure.pgcode = getattr(exc, "pgcode", None)
            raise failure from None
        result["queries"] = self.queries
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT pg_catalog.pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint "
                "WHERE conrelid = %s AND conname = %s", (self.info["oid"], self.name))
            row = cur.fetchone()
        if row and m._diff:
            result["diff"]["after"] = f"{self.name}: {row[0]}\n"
        result["definition"] = row[0] if row else definition
        return result


# --------------------------------------------------------------------------- the ledger row of a table


def record_in_ledger(module, conn, ledger, run_id, result, record):
    """Write the table's ledger row (what pg_ledger ``action: table`` wrote after each constraint): status
    constrained, the constraint in effect, the key, keep and order_by, and constraint_created when this run made
    it. In its own short transaction on the module's connection; check mode reads only. Returns
    {changed, before, after}."""
    values = {"status": "constrained", "constraint_name": result["name"],
              "natural_key": list(record.get("natural_key") or result["columns"]),
              "keep": record.get("keep"), "order_by": record.get("order_by")}
    if result["changed"]:
        values["constraint_created"] = True
    values = {k: v for k, v in values.items() if v is not None}
    where = '"%s"."%s"' % (result["schema"], result["table"])
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            if not ledger.exists(cur):
                if module.check_mode:
                    return {"changed": True, "before": None, "after": None}
                raise Failed("the ledger %s does not exist yet (run pg_ledger action=init first); the constraint of "
                             "%s is in place but not recorded" % (ledger.schema, where))
            if module.check_mode:
                before = ledger.table_json(cur, run_id, result["schema"], result["table"])
                after = dict(before or {"run_id": run_id, "schema_name": result["schema"],
                                        "table_name": result["table"]})
                after.update(values)
            else:
                before, after = ledger.put_table(cur, run_id, result["schema"], result["table"], values)
        differs = ledger_changed(before, after)
        if module.check_mode or not differs:
            conn.rollback()
        else:
            conn.commit()
        return {"changed": differs, "before": before, "after": after}
    except DedupPgError as exc:
        conn.rollback()
        raise Failed("recording the constraint of %s in the ledger failed: %s" % (where, exc)) from None
    except psycopg2.Error as exc:
        conn.rollback()
        raise Failed("recording the constraint of %s in the ledger failed: %s" % (where, error_text(exc, module))) \
            from None
    finally:
        conn.autocommit = True


# --------------------------------------------------------------------------- one table, and the module


def ensure_table(module, conn, spec, watch, version=None, ledger=None, run_id=None):
    """One table, in single and list mode alike: the constraint ensured (or dropped), then, when ``spec`` has a
    ``record`` and there is a ledger run, the table's ledger row (list mode). Returns (result, queries run);
    Failed carries the message and the queries run so far."""
    conn.rollback()
    conn.autocommit = True
    uc = UniqueConstraint(module, spec, conn=conn, watch=watch, version=version)
    try:
        result = uc.run()
    except Failed as exc:
        exc.extra.setdefault("queries", uc.queries)
        raise
    except psycopg2.Error as exc:
        raise Failed('"%s"."%s": %s' % (uc.schema, uc.table, error_text(exc, module)), queries=uc.queries) from None
    record = spec.get("record")
    if record is not None and ledger is not None and run_id and module.params["state"] == "present" \
            and (result["changed"] or spec.get("record_always")):
        try:
            result["ledger"] = record_in_ledger(module, conn, ledger, run_id, result, record)
        except Failed as exc:
            exc.extra.setdefault("queries", uc.queries)
            raise
    return result, uc.version
