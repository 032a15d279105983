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
from ansible.module_utils.dedup_ledger import Ledger
from ansible.module_utils.dedup_ledger import changed as ledger_changed
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
    check_columns,
    connect,
    error_text,
    find_equivalent_unique,
    fit_name,
    get_table,
    pg_common_argument_spec,
    psycopg2,
    qualified,
    server_version_num,
    sql,
    validate_identifier,
)

UNIQUE_VIOLATION = "23505"
# The per-table options: of the module in single mode, of each element of ``constraints`` in list mode.
TABLE_OPTIONS = ("schema", "table", "columns", "name", "nulls_not_distinct")


class Failed(Exception):
    """One table could not be done: ``msg`` as the module reports it, ``extra`` more result keys."""

    def __init__(self, msg, **extra):
        super().__init__(msg)
        self.msg = msg
        self.extra = extra


class UniqueConstraint:
    """One table's constraint: ``spec`` holds TABLE_OPTIONS; the shared options (state, concurrently, lock_timeout,
    retries, ...) are the module's. ``conn`` (autocommit) is the module's one connection; ``watch`` its PlayWatch."""

    def __init__(self, module, spec, conn=None, watch=None, version=None):
        self.module = module
        self.spec = spec
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
        (module_utils/dedup_locks.py); fail naming the sessions in the way."""
        p = self.module.params

        def attempt(_number):
            if in_transaction:
                self.conn.autocommit = False
                with self.conn.cursor() as cur:
                    cur.execute("SELECT set_config('lock_timeout', %s, true)", (p["lock_timeout"],))
                    cur.execute("SELECT set_config('statement_timeout', %s, true)", (p["statement_timeout"],))
                    for stmt in statements:
                        cur.execute(stmt)
                self.conn.commit()
                self.conn.autocommit = True
            else:
                self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("SELECT set_config('lock_timeout', %s, false)", (p["lock_timeout"],))
                    cur.execute("SELECT set_config('statement_timeout', %s, false)", (p["statement_timeout"],))
                    try:
                        for stmt in statements:
                            cur.execute(stmt)
                    finally:
                        cur.execute("RESET lock_timeout; RESET statement_timeout")

        def before_retry(_number, _exc):
            if not in_transaction:  # CREATE INDEX CONCURRENTLY leaves an INVALID index behind
                self.drop_invalid_leftover()

        where = f'table "{self.schema}"."{self.table}"'
        try:
            with_lock_retries(self.conn, attempt, p["retries"], p["retry_delay"], watch=self.watch,
                              before_retry=before_retry)
        except PlayGone as gone:
            self.conn.autocommit = True
            self.fail(f"the play that started pg_unique_constraint on {where} is gone; stopped after "
                      f"{gone.attempts} attempt(s) that could not get their locks, no DDL was applied")
        except LockRetriesExhausted as exc:
            holders = sessions_in_the_way(self.conn, self.info["oid"])
            self.conn.autocommit = True
            self.fail(lock_failure_message(where, exc.attempts, error_text(exc.error, self.module), holders,
                                           lock_timeout=p["lock_timeout"], delay=p["retry_delay"],
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
                cur.execute("SELECT set_config('lock_timeout', %s, false)", (self.module.params["lock_timeout"],))
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
        p = m.params
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
        attach = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
            qualified(self.schema, self.table), sql.Identifier(self.name), sql.Identifier(self.name))
        try:
            self.run_ddl([attach])
        except psycopg2.Error as exc:
            self.fail(f'attaching index "{self.name}" as a UNIQUE constraint failed: {error_text(exc, m)}')
        result["queries"] = self.queries
        return result

    def present(self):
        m = self.module
        p = m.params
        want_nnd = bool(self.spec["nulls_not_distinct"])
        nullable = [c["name"] for c in self.info["columns"] if c["name"] in self.columns and not c["not_null"]]
        with self.conn.cursor() as cur:
            candidates = find_equivalent_unique(cur, self.info["oid"], self.columns)
        equivalent = None
        for cand in candidates:
            if not cand["usable"]:
                continue
            if nullable and want_nnd and not cand["nulls_not_distinct"]:
                m.warn("{} {} covers the same columns but treats NULLs as distinct; it does not count as "
                       "equivalent to the NULLS NOT DISTINCT constraint requested because key columns {} are "
                       "nullable".format(cand["type"], cand["name"], ", ".join(nullable)))
                continue
            equivalent = cand
            break
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

        dups = self.duplicates(want_nnd)
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
                self.run_ddl([create], in_transaction=False)
                attach = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                    tbl, sql.Identifier(self.name), sql.Identifier(self.name))
                self.run_ddl([attach])
            else:
                stmts = []
                if leftover:
                    stmts.append(sql.SQL("DROP INDEX IF EXISTS {}").format(qualified(self.schema, self.name)))
                stmts.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE{} ({})").format(
                    tbl, sql.Identifier(self.name), nnd_sql, cols))
                self.run_ddl(stmts)
        except psycopg2.Error as exc:
            if p["concurrently"]:
                try:
                    self.drop_invalid_leftover()
                except psycopg2.Error:
                    pass
            hint = ""
            if getattr(exc, "pgcode", None) == UNIQUE_VIOLATION:
                hint = " (duplicates appeared after the check: is the ETL still running?)"
            self.fail(f'adding UNIQUE ({", ".join(self.columns)}) to "{self.schema}"."{self.table}" failed{hint}: '
                      f"{error_text(exc, m)}")
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
