"""The dedup-rollout ledger, read and written in one place.

The schema is ``sql/ledger.sql.j2`` (``runs``, ``table_runs``) and ``sql/monitor_checks.sql.j2``
(``monitor_checks``), created by pg_ledger / pg_monitor ``action=init``. Every module that reads or writes those
tables does it through ``Ledger``: pg_ledger (a thin module over it), pg_dedup_plan (the runs to resume and the
table rows done), pg_monitor and pg_backup_cleanup (the deploy, its rollbacks/cleanups, the last monitoring check),
pg_restore_rows (a table row's status, set to rolled_back in the restore's transaction) and the online path
(module_utils/dedup_online.py: its table row, the removed-rows counter in each batch's transaction, the finish).

Not here: ``sql/migrate_table.sql.j2`` writes the offline migration's table row itself (``-- @step ledger``, in the
migration's own transaction, with the fingerprint of the kept keys); its column names are the ones listed below.

``Ledger(schema, execute=None)``: ``schema`` is the ledger schema (validated as an identifier); ``execute(cur, stmt,
params)`` runs every statement (default ``cur.execute``) so that a caller can log what it ran. Every method takes the
cursor, so the caller decides the transaction (a ledger write goes into the same transaction as the work it
records). All SQL is composed with psycopg2.sql.
"""

from __future__ import annotations

import json

from ansible.module_utils.dedup_pg import DedupPgError, validate_identifier

try:
    from psycopg2 import sql
except ImportError:  # pragma: no cover - exercised only on hosts without psycopg2
    sql = None

# The columns of sql/ledger.sql.j2, in its order.
RUN_COLUMNS = ("run_id", "kind", "status", "environment", "mode", "backup_mode", "target_run_id", "dump_path",
               "dump_bytes", "dump_sha256", "dump_host", "etl_release_before", "etl_release_after", "started_at",
               "finished_at", "details")
TABLE_COLUMNS = ("run_id", "schema_name", "table_name", "natural_key", "keep", "order_by", "status", "strategy",
                 "backup_mode", "backup_table", "rows_before", "rows_kept", "rows_removed", "keep_fingerprint",
                 "size_before", "size_after", "constraint_name", "constraint_created", "started_at", "finished_at",
                 "seconds")
CHECK_COLUMNS = ("check_id", "deploy_run_id", "checked_at", "source", "clean", "environment", "host",
                 "duplicate_rows", "problems", "details")
# What a caller may set (pg_ledger's values): the keys and start times are the ledger's own.
RUN_SETTABLE = frozenset(RUN_COLUMNS) - {"run_id", "started_at"}
TABLE_SETTABLE = frozenset(("status", "constraint_name", "constraint_created", "size_after", "finished_at",
                            "natural_key", "keep", "order_by", "size_before", "rows_before", "rows_kept",
                            "rows_removed", "backup_mode", "backup_table"))
RUN_KINDS = ("deploy", "rollback", "cleanup")
RUN_STATUSES = ("running", "failed", "succeeded", "rolled_back", "cleaned")
TABLE_STATUSES = ("deduplicated", "constrained", "rolled_back", "cleaned")
LEDGER_TABLES = ("runs", "table_runs", "monitor_checks")
# Not compared when deciding whether a write changed a row (it moves on every write).
UNCOMPARED = frozenset(("finished_at",))
STARTED_AT_TEXT = "started_at_text"  # runs(): started_at as text, with the session's UTC offset


class LedgerError(DedupPgError):
    """A ledger request that cannot be done (message says why; nothing was written)."""


def jsonable(value):
    """A ledger value as JSON can carry it: timestamps as ISO 8601, numerics as float."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value.__class__.__name__ == "Decimal":
        return float(value)
    return value


def changed(before, after):
    """Whether a write changed a row (``before`` None = it is new); finished_at alone is no change."""
    return before is None or any(before.get(k) != after.get(k) for k in after if k not in UNCOMPARED)


def assignments(values, allowed):
    """``SET`` items and their parameters for ``values`` (column -> value); LedgerError names an unknown column.

    ``finished_at: now`` (or true) is the server's clock; ``details`` is merged into the JSON of runs."""
    sets, params = [], []
    for col, val in sorted(values.items()):
        if col not in allowed:
            raise LedgerError("pg_ledger: unknown column %r (allowed: %s)" % (col, ", ".join(sorted(allowed))))
        if col == "finished_at" and val in ("now", True):
            sets.append(sql.SQL("finished_at = clock_timestamp()"))
        elif col == "details":
            sets.append(sql.SQL("details = details || %s::jsonb"))
            params.append(json.dumps(val))
        else:
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(col)))
            params.append(val)
    return sets, params


class Ledger:
    """The ledger tables of one schema (see the module docstring)."""

    def __init__(self, schema, execute=None):
        self.schema = validate_identifier(schema, "backup schema")
        self._execute = execute
        self.runs_table = sql.Identifier(schema, "runs")
        self.tables_table = sql.Identifier(schema, "table_runs")
        self.checks_table = sql.Identifier(schema, "monitor_checks")

    def name(self, table="table_runs"):
        """schema.table as text (for messages)."""
        return "%s.%s" % (self.schema, table)

    def execute(self, cur, stmt, params=None):
        if self._execute is not None:
            return self._execute(cur, stmt, params)
        return cur.execute(stmt, params)

    # ------------------------------------------------------------------ exists
    def present(self, cur):
        """Which of runs, table_runs, monitor_checks exist: {name: bool}."""
        self.execute(cur, "SELECT t, to_regclass(format('%%I.%%I', %s::text, t)) IS NOT NULL "
                          "FROM unnest(%s::text[]) t", (self.schema, list(LEDGER_TABLES)))
        return dict(cur.fetchall())

    def exists(self, cur):
        """Whether the ledger exists: runs and table_runs both."""
        found = self.present(cur)
        return bool(found["runs"] and found["table_runs"])

    def checks_exist(self, cur):
        """Whether monitor_checks exists."""
        return bool(self.present(cur)["monitor_checks"])

    def create(self, cur, init_sql):
        """Run the rendered sql/ledger.sql.j2 (or sql/monitor_checks.sql.j2)."""
        self.execute(cur, init_sql)

    def owners(self, cur):
        """Owner of the ledger schema and of its tables (None when absent), and the connecting role."""
        self.execute(cur, "SELECT current_user::text, (SELECT pg_catalog.pg_get_userbyid(n.nspowner)::text "
                          "FROM pg_catalog.pg_namespace n WHERE n.nspname = %s)", (self.schema,))
        user, schema_owner = cur.fetchone()
        self.execute(cur, "SELECT c.relname::text, pg_catalog.pg_get_userbyid(c.relowner)::text "
                          "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = %s AND c.relname = ANY (%s) ORDER BY 1",
                     (self.schema, list(LEDGER_TABLES)))
        return {"current_user": user, "schema_owner": schema_owner, "tables": dict(cur.fetchall())}

    # ------------------------------------------------------------------ runs
    @staticmethod
    def _columns(columns, allowed):
        out = []
        for col in columns:
            if col == STARTED_AT_TEXT:
                out.append(sql.SQL("to_char(started_at, 'YYYY-MM-DD\"T\"HH24:MI:SSOF')"))
            elif col in allowed:
                out.append(sql.Identifier(col))
            else:
                raise LedgerError("not a ledger column: %r" % (col,))
        return sql.SQL(", ").join(out)

    def runs(self, cur, columns=RUN_COLUMNS, run_id=None, kind=None, target_run_id=None, limit=None):
        """Run rows (dicts of ``columns``), newest first; each filter given narrows them."""
        where, params = [], []
        for col, val in (("run_id", run_id), ("kind", kind), ("target_run_id", target_run_id)):
            if val is not None:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(col)))
                params.append(val)
        stmt = sql.SQL("SELECT {} FROM {}").format(self._columns(columns, RUN_COLUMNS), self.runs_table)
        if where:
            stmt += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        stmt += sql.SQL(" ORDER BY started_at DESC")
        if limit is not None:
            stmt += sql.SQL(" LIMIT {}").format(sql.Literal(int(limit)))
        self.execute(cur, stmt, params)
        return [dict(zip(columns, r)) for r in cur.fetchall()]

    def latest_deploy(self, cur, columns=RUN_COLUMNS, run_id=None):
        """The deploy ``run_id`` (any deploy when empty: the newest), or None."""
        found = self.runs(cur, columns, run_id=run_id or None, kind="deploy", limit=1)
        return found[0] if found else None

    def run_json(self, cur, run_id):
        """The run row as JSON (the server's row_to_json), or None."""
        self.execute(cur, sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s").format(self.runs_table),
                     (run_id,))
        row = cur.fetchone()
        return json.loads(row[0]) if row else None

    def put_run(self, cur, run_id, values):
        """Insert (values.kind and values.status needed) or update the run row: (before, after) as JSON."""
        before = self.run_json(cur, run_id)
        values = dict(values)
        sets, params = assignments(values, RUN_SETTABLE)
        if before is None:
            if "kind" not in values or "status" not in values:
                raise LedgerError("a new run needs values.kind and values.status")
            self.execute(cur, sql.SQL("INSERT INTO {} (run_id, kind, status) VALUES (%s, %s, %s)")
                         .format(self.runs_table), (run_id, values["kind"], values["status"]))
        if sets:
            self.execute(cur, sql.SQL("UPDATE {} SET {} WHERE run_id = %s").format(
                self.runs_table, sql.SQL(", ").join(sets)), params + [run_id])
        return before, self.run_json(cur, run_id)

    # ------------------------------------------------------------------ table rows
    def table_rows(self, cur, run_id, columns=TABLE_COLUMNS, with_backup_table=False, order="table"):
        """Table rows of a run (dicts of ``columns``); ``order``: table (by name), started (then name) or None."""
        stmt = sql.SQL("SELECT {} FROM {} WHERE run_id = %s").format(self._columns(columns, TABLE_COLUMNS),
                                                                     self.tables_table)
        if with_backup_table:
            stmt += sql.SQL(" AND backup_table IS NOT NULL")
        if order == "table":
            stmt += sql.SQL(" ORDER BY table_name")
        elif order == "started":
            stmt += sql.SQL(" ORDER BY started_at NULLS LAST, table_name")
        self.execute(cur, stmt, (run_id,))
        return [dict(zip(columns, r)) for r in cur.fetchall()]

    def _key(self):
        return sql.SQL("run_id = %(run)s AND schema_name = %(schema)s AND table_name = %(table)s")

    def table_json(self, cur, run_id, schema, table):
        """The table row of a run as JSON, or None."""
        self.execute(cur, sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE {}").format(
            self.tables_table, self._key()), {"run": run_id, "schema": schema, "table": table})
        row = cur.fetchone()
        return json.loads(row[0]) if row else None

    def table_status(self, cur, run_id, schema, table):
        """status of the table row of a run, or None when there is none."""
        self.execute(cur, sql.SQL("SELECT status FROM {} WHERE {}").format(self.tables_table, self._key()),
                     {"run": run_id, "schema": schema, "table": table})
        row = cur.fetchone()
        return row[0] if row else None

    def start_table(self, cur, run_id, schema, table, natural_key, keep, order_by, status, size_of=None,
                    if_absent=False, **values):
        """Insert the table row of a run, started now. ``values``: more columns (strategy, backup_mode, ...);
        ``size_of``: a regclass text whose pg_total_relation_size becomes size_before; ``if_absent``: leave an
        existing row as it is (ON CONFLICT DO NOTHING)."""
        cols = ["run_id", "schema_name", "table_name", "natural_key", "keep", "order_by", "status"]
        exprs = [sql.Placeholder(c) for c in cols]
        params = {"run_id": run_id, "schema_name": schema, "table_name": table, "natural_key": list(natural_key),
                  "keep": keep, "order_by": order_by, "status": status}
        for col, val in sorted(values.items()):
            if col not in TABLE_COLUMNS or col in params:
                raise LedgerError("not a ledger column to start a table row with: %r" % (col,))
            cols.append(col)
            exprs.append(sql.Placeholder(col))
            params[col] = val
        if size_of is not None:
            cols.append("size_before")
            exprs.append(sql.SQL("pg_catalog.pg_total_relation_size(%(size_of)s::regclass)"))
            params["size_of"] = size_of
        cols.append("started_at")
        exprs.append(sql.SQL("clock_timestamp()"))
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.tables_table, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(exprs))
        if if_absent:
            stmt += sql.SQL(" ON CONFLICT (run_id, schema_name, table_name) DO NOTHING")
        self.execute(cur, stmt, params)

    def put_table(self, cur, run_id, schema, table, values):
        """Update (or, given values.natural_key and values.status, insert) the table row of a run: (before, after)
        as JSON."""
        before = self.table_json(cur, run_id, schema, table)
        sets, params = assignments(values, TABLE_SETTABLE)
        if before is None:
            if not values.get("natural_key") or not values.get("status"):
                raise LedgerError("no ledger row for table %s.%s in run %s (give values.natural_key and "
                                  "values.status to create one)" % (schema, table, run_id))
            self.start_table(cur, run_id, schema, table, values["natural_key"], values.get("keep", "oldest"),
                             values.get("order_by", ""), values["status"])
        if sets:
            key = sql.SQL("run_id = %s AND schema_name = %s AND table_name = %s")
            self.execute(cur, sql.SQL("UPDATE {} SET {} WHERE ").format(self.tables_table, sql.SQL(", ").join(sets))
                         + key, params + [run_id, schema, table])
        return before, self.table_json(cur, run_id, schema, table)

    def mark_rolled_back(self, cur, run_id, schema, table):
        """status rolled_back for the table row of a run (in the restore's transaction)."""
        self.execute(cur, sql.SQL("UPDATE {} SET status = 'rolled_back' WHERE {}").format(
            self.tables_table, self._key()), {"run": run_id, "schema": schema, "table": table})

    def add_removed(self, cur, run_id, schema, table, rows):
        """rows_removed += rows (the online path, in the transaction of the batch that removed them)."""
        self.execute(cur, sql.SQL("UPDATE {} SET rows_removed = coalesce(rows_removed, 0) + %(n)s WHERE {}").format(
            self.tables_table, self._key()), {"n": rows, "run": run_id, "schema": schema, "table": table})

    def finish_table(self, cur, run_id, schema, table, rows_before, constraint_name, size_of):
        """The online path's finish: rows_before (unless set), rows_kept, finished_at, seconds, the constraint,
        size_after of ``size_of`` (regclass text). Returns {rows_before, rows_kept, rows_removed} or None."""
        self.execute(cur, sql.SQL(
            "UPDATE {} SET rows_before = coalesce(rows_before, %(before)s), "
            "rows_kept = coalesce(rows_before, %(before)s) - rows_removed, "
            "finished_at = clock_timestamp(), seconds = extract(epoch FROM clock_timestamp() - started_at), "
            "constraint_name = %(cname)s, constraint_created = true, "
            "size_after = pg_catalog.pg_total_relation_size(%(reg)s::regclass) "
            "WHERE {} RETURNING rows_before, rows_kept, rows_removed").format(self.tables_table, self._key()),
            {"before": rows_before, "cname": constraint_name, "reg": size_of, "run": run_id, "schema": schema,
             "table": table})
        row = cur.fetchone()
        return {"rows_before": row[0], "rows_kept": row[1], "rows_removed": row[2]} if row else None

    # ------------------------------------------------------------------ monitoring checks
    def last_check(self, cur, deploy_run_id):
        """The newest monitoring check of a deploy (check_id, checked_at, source, clean, problems, host), or None."""
        self.execute(cur, sql.SQL("SELECT check_id, checked_at, source, clean, problems, host FROM {} "
                                  "WHERE deploy_run_id = %s ORDER BY checked_at DESC, check_id DESC LIMIT 1")
                     .format(self.checks_table), (deploy_run_id,))
        row = cur.fetchone()
        if row is None:
            return None
        return {"check_id": row[0], "checked_at": row[1], "source": row[2], "clean": row[3],
                "problems": list(row[4] or []), "host": row[5]}

    def record_check(self, cur, deploy_run_id, checked_at, source, clean, environment, host, duplicate_rows,
                     problems, details):
        """Insert a monitoring check; returns its check_id."""
        self.execute(cur, sql.SQL("INSERT INTO {} (deploy_run_id, checked_at, source, clean, environment, host, "
                                  "duplicate_rows, problems, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                                  "RETURNING check_id").format(self.checks_table),
                     (deploy_run_id, checked_at, source, clean, environment, host, duplicate_rows, problems,
                      json.dumps(details)))
        return cur.fetchone()[0]
