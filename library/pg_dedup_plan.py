#!/usr/bin/python
"""Read-only: everything the migration needs to know about the target database, in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_dedup_plan
short_description: Inspect a database and plan the deduplication of a list of tables (read-only)
description:
  - Checks every table and natural-key column against the catalog and returns, per table, the facts
    the migration template needs (primary key, insertable columns, identity, enabled triggers, sizes,
    strategy) plus the server facts preflight needs (version, standby, superuser, privileges).
  - Reads the dedup-rollout ledger when it exists, so that a re-run after an interruption resumes the
    unfinished deploy (same run id) instead of starting a new one.
  - Never changes anything; runs in check mode.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  schema:
    description: Schema of the tables.
    type: str
    required: true
  tables:
    description:
      - Tables to plan, each a dict with C(name), C(natural_key) (list), optional C(keep) (oldest|newest)
        and C(order_by) (column deciding "oldest"; default the primary key).
    type: list
    elements: dict
    required: true
  backup_schema:
    description: Schema of the ledger and the backup tables.
    type: str
    default: dedup_rollout
  run_id:
    description: Run id to use when no unfinished deploy is found in the ledger.
    type: str
    required: true
  resume:
    description: Resume an unfinished deploy found in the ledger (its run id is returned as C(deploy_id)).
    type: bool
    default: true
  strategy:
    description: C(replace) (TRUNCATE and re-insert the kept rows) or C(delete) (DELETE then VACUUM FULL).
    type: str
    default: replace
    choices: [replace, delete]
  mode:
    description:
      - C(offline) (the migration template, with C(strategy)) or C(online) (batched DELETEs, no TRUNCATE); decides
        which replication checks apply.
    type: str
    default: offline
    choices: [offline, online]
  check_neighbours:
    description:
      - Refuse, naming the object and the option that allows it, when something outside the tables would see the
        migration wrongly - a publication that does not publish TRUNCATE, or any logical replication slot of the
        database, with strategy C(replace); a subscription writing into a table with strategy C(replace); a
        published table without a usable replica identity with strategy C(delete) or online mode; rewrite rules
        on a table; a ledger schema or ledger table owned by another role than the connecting one.
      - Preflight sets it; the facts (C(neighbours) per table, C(slots), C(ledger.owners)) are returned either way.
    type: bool
    default: false
  allow_truncate_replication:
    description:
      - With C(check_neighbours), let strategy C(replace) run although publications, logical slots or subscriptions
        see the table (a DBA who knows every downstream consumer handles TRUNCATE followed by the re-inserted rows).
    type: bool
    default: false
  wait_for_idle:
    description:
      - When other dedup-rollout sessions are still working in the database (a killed play's migration goes on until
        its transaction ends), return them in C(busy_sessions) and make no plan (their locks could hold the plan's
        reads); the task retries until they are gone. Without it the plan is made and the sessions only reported.
    type: bool
    default: false
notes:
  - Tables referenced by another table's foreign key and tables in an inheritance tree are refused with a clear
    message (removing rows there would cascade or mix other tables in).
  - A partitioned table is planned as one table (its partitions are deduplicated together, the constraint goes
    on it) when its natural key contains every partition key column; otherwise, or when it is partitioned by an
    expression, or when a single partition is listed, it is refused naming what would be needed.
"""

EXAMPLES = r"""
- name: Plan the deduplication
  pg_dedup_plan:
    login_host: db.example.com
    login_db: breezeway
    login_user: breezeway
    login_password: "{{ dedup_db_password }}"
    schema: breezeway
    run_id: "20261125T210000Z"
    tables:
      - {name: task_requirements, natural_key: [task_pk, requirement_id]}
  register: plan
"""

RETURN = r"""
busy_sessions:
  description:
    - Other dedup-rollout sessions still working in the database (pid, application, state, xact_seconds, query),
      e.g. the migration of a killed play. With C(wait_for_idle) and any of them there, nothing else is returned
      (no plan is made); retry the task until this list is empty.
  returned: always
  type: list
  elements: dict
deploy_id:
  description: The run id of this deploy (an unfinished one's when resuming).
  returned: always
  type: str
resumed:
  description: Whether an unfinished deploy is resumed.
  returned: always
  type: bool
server:
  description:
    - version_num, in_recovery, is_superuser, database_size, data_directory (when readable), current_user.
    - dump_unreadable, the relations pg_dump would fail on (the connecting role lacks SELECT; every schema but
      the system ones and C(backup_schema)), as C(count) and C(relations) (the first 20, "schema.name (kind)").
  returned: always
  type: dict
ledger:
  description: exists, the resumed run's row (dump path, sha256, ...), the finished table statuses, owners (of the
    schema and ledger tables, and the connecting role).
  returned: always
  type: dict
tables:
  description: Per table, the facts used by sql/migrate_table.sql.j2, and neighbours (publications, subscriptions,
    rules, replica identity).
  returned: always
  type: list
slots:
  description: Logical replication slots of the database (name, plugin, active); null when they cannot be read.
  returned: success
  type: list
slots_unknown:
  description: Why C(slots) could not be read (the server's message), else null.
  returned: success
  type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_ledger import STARTED_AT_TEXT, Ledger
from ansible.module_utils.dedup_locks import lock_sessions
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    busy_sessions,
    check_columns,
    connect,
    error_text,
    find_equivalent_unique,
    get_table,
    logical_slots,
    pg_common_argument_spec,
    replica_identity,
    server_version_num,
    table_publications,
    table_rules,
    table_subscriptions,
    validate_identifier,
)
from ansible.module_utils.dedup_pg import (
    dump_unreadable as dump_unreadable_of,
)
from ansible.module_utils.dedup_pg import (
    total_size as total_size_of,
)
from ansible.module_utils.dedup_plan import backup_table_name

# What the plan returns of the earlier runs; started_at as text under the key "to_char" (what preflight's plan.yml
# prints when it resumes a run).
PLAN_RUN_COLUMNS = ("run_id", "kind", "status", "environment", "dump_path", "dump_sha256", "dump_bytes", "dump_host",
                    "etl_release_before", STARTED_AT_TEXT)
PLAN_TABLE_COLUMNS = ("table_name", "status", "backup_table", "constraint_name", "constraint_created", "rows_before",
                      "rows_kept", "rows_removed", "keep_fingerprint")


def _ledger(cur, backup_schema, run_id, resume):
    ledger = Ledger(backup_schema)
    out = {"exists": ledger.exists(cur), "resumed_run": None, "table_status": {}, "runs": []}
    deploy_id, resumed = run_id, False
    if not out["exists"]:
        return out, deploy_id, resumed
    out["runs"] = [{("to_char" if k == STARTED_AT_TEXT else k): v for k, v in r.items()}
                   for r in ledger.runs(cur, PLAN_RUN_COLUMNS, limit=20)]
    unfinished = [r for r in out["runs"] if r["kind"] == "deploy" and r["status"] in ("running", "failed")]
    if resume and unfinished:
        deploy_id, resumed = unfinished[0]["run_id"], True
        out["resumed_run"] = unfinished[0]
    out["table_status"] = {r["table_name"]: r for r in ledger.table_rows(cur, deploy_id, PLAN_TABLE_COLUMNS,
                                                                         order=None)}
    return out, deploy_id, resumed


def _server(cur):
    version = server_version_num(cur)
    cur.execute(
        "SELECT pg_is_in_recovery(), r.rolsuper, pg_database_size(current_database()), current_user, "
        "current_database(), version(), "
        "has_database_privilege(current_database(), 'CREATE'), "
        "has_database_privilege(current_database(), 'TEMPORARY') "
        "FROM pg_roles r WHERE r.rolname = current_user"
    )
    rec, sup, size, user, db, ver, can_create, can_temp = cur.fetchone()
    cur.execute(
        "SELECT CASE WHEN pg_has_role(current_user, 'pg_read_all_settings', 'member') OR %s "
        "THEN current_setting('data_directory') END",
        (bool(sup),),
    )
    datadir = cur.fetchone()[0]
    return {
        "version_num": version, "version": ver, "in_recovery": bool(rec), "is_superuser": bool(sup),
        "database_size": size, "current_user": user, "database": db, "data_directory": datadir,
        "can_create_schema": bool(can_create), "can_create_temp": bool(can_temp),
    }


def _check_partitioning(module, info, schema, name, key):
    """A partition alone, or a partitioned table whose key cannot carry a UNIQUE constraint: refuse, saying why."""
    if info["is_partition"]:
        parents = ", ".join(info["inherits_from"])
        module.fail_json(msg='table "%s"."%s" is a partition of %s: list the partitioned table %s in dedup_tables '
                             'instead (each of its partitions is deduplicated, the UNIQUE constraint goes on it)'
                             % (schema, name, parents, parents))
    if not info["partitioned"]:
        return
    if info["partition_key_expression"]:
        module.fail_json(msg='table "%s"."%s" is partitioned by an expression: PostgreSQL cannot put a UNIQUE '
                             'constraint on it (a unique key of a partitioned table must contain every partition '
                             'key column, as a plain column). Not supported: deduplicate it by hand per partition, '
                             'or repartition by columns of the natural key.' % (schema, name))
    missing = [c for c in info["partition_key"] if c not in key]
    if missing:
        module.fail_json(
            msg='table "%s"."%s" is partitioned by (%s), and the natural key (%s) does not contain %s. PostgreSQL '
                'only allows a UNIQUE constraint on a partitioned table when it contains every partition key '
                'column, so this key cannot be constrained on the table. If equal keys only ever repeat within one '
                'partition (the partition column is a property of the entity, e.g. its creation date), add %s to '
                'natural_key; otherwise keeping the key unique across partitions needs something PostgreSQL does '
                'not have (a global unique index): leave the table out, or repartition it.'
                % (schema, name, ", ".join(info["partition_key"]), ", ".join(key), ", ".join(missing),
                   ", ".join(missing)))


def _plan_table(module, cur, schema, spec, strategy, deploy_id, status):
    name = spec.get("name")
    info = get_table(cur, schema, name, module, refuse_inheritance=True)
    key = check_columns(info, spec.get("natural_key") or [], module, "natural-key column")
    _check_partitioning(module, info, schema, name, key)
    keep = spec.get("keep") or "oldest"
    if keep not in ("oldest", "newest"):
        module.fail_json(msg='table "%s": keep must be oldest or newest, not %r' % (name, keep))
    pk = info["primary_key"]
    # A partitioned table's primary key holds the partition key too: its other column is the row's age.
    own = [c for c in pk if c not in info["partition_key"]]
    order_by = spec.get("order_by") or (pk[0] if len(pk) == 1 else own[0] if len(own) == 1 else None)
    if order_by is None:
        module.fail_json(msg='table "%s"."%s" has no single-column primary key: set order_by for it in dedup_tables '
                             '(the column that decides which row is the oldest)' % (schema, name))
    check_columns(info, [order_by], module, "order_by column")
    if info["referenced_by"]:
        refs = "; ".join("%s (%s)" % (r["table"], r["name"]) for r in info["referenced_by"])
        module.fail_json(msg='table "%s"."%s" is referenced by foreign keys of other tables: %s. Removing its '
                             'duplicate rows would orphan or cascade to those rows; repoint them to the kept row '
                             'or leave this table out of dedup_tables.' % (schema, name, refs))
    cur.execute(
        "SELECT pg_total_relation_size(%s), pg_relation_size(%s), greatest(reltuples, 0)::bigint, "
        "has_table_privilege(%s, 'SELECT,INSERT,DELETE,TRUNCATE'), pg_has_role(relowner, 'USAGE') "
        "FROM pg_class WHERE oid = %s",
        (info["oid"], info["oid"], info["oid"], info["oid"]),
    )
    total_size, heap_size, estimate, has_privs, is_owner = cur.fetchone()
    if info["partitioned"]:  # the parent stores nothing: its partitions do
        cur.execute("SELECT coalesce(sum(pg_relation_size(t.relid)), 0)::bigint, "
                    "coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_partition_tree(%s) t "
                    "JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf", (info["oid"],))
        heap_size, estimate = cur.fetchone()
        total_size = total_size_of(cur, info["oid"])
    missing = []
    for priv in ("SELECT", "INSERT", "DELETE", "TRUNCATE"):
        cur.execute("SELECT has_table_privilege(%s, %s)", (info["oid"], priv))
        if not cur.fetchone()[0]:
            missing.append(priv)
    # Sessions with an open transaction holding or waiting for locks on the table (the one description of
    # module_utils/dedup_locks.py; preflight refuses the long ones).
    blockers = lock_sessions(cur, info["oid"], in_transaction_only=True)
    cols = {c["name"]: c for c in info["columns"]}
    insert_columns = [c["name"] for c in info["columns"] if not c["generated"]]
    existing = [e for e in find_equivalent_unique(cur, info["oid"], key) if e["usable"] and not e["primary_key"]]
    return {
        "schema": schema,
        "table": name,
        "oid": info["oid"],
        "natural_key": key,
        "keep": keep,
        "order_by": order_by,
        "pk": pk,
        "rowid": pk if pk else ["ctid"],
        "hashagg": len(pk) == 1 and order_by == pk[0],
        "partitioned": info["partitioned"],
        "partitions": info["partitions"],
        "insert_columns": insert_columns,
        "identity_always": any(c["identity"] == "a" for c in info["columns"]),
        "triggers": [t for t in info["triggers"] if t["enabled"] in ("O", "A", "R")],
        "strategy": strategy,
        "size_before": total_size,
        "heap_size": heap_size,
        "rows_estimate": estimate,
        "missing_privileges": missing,
        "is_owner": bool(is_owner),
        "key_nullable": [c for c in key if not cols[c]["not_null"]],
        "existing_constraint": existing[0] if existing else None,
        "lock_holders": blockers,
        "backup_table": backup_table_name(name, deploy_id),
        "ledger": status.get(name),
        "neighbours": _neighbours(cur, schema, name, info["oid"]),
    }


def _neighbours(cur, schema, name, oid):
    """Who else sees this table's rows change: publications, subscriptions; and what would divert them: rules."""
    subs, subs_unknown = table_subscriptions(cur, oid)
    return {"publications": table_publications(cur, schema, name), "subscriptions": subs,
            "subscriptions_unknown": subs_unknown, "rules": table_rules(cur, oid),
            "replica_identity": replica_identity(cur, oid)}


TRUNCATE_WAY_OUT = ("Use -e preflight_strategy=delete (the DELETE of the removed rows is replicated row by row), or, "
                    "if you know every downstream copy handles this, -e preflight_allow_truncate_replication=true.")


def _refusals(p, database, tables, slots, slots_unknown, owners):
    """What preflight must refuse (each names the object and the option that allows it), and what it warns of."""
    refuse, warn = [], []
    truncates = p["mode"] == "offline" and p["strategy"] == "replace"
    deletes = not truncates
    for t in tables:
        qname = "%s.%s" % (t["schema"], t["table"])
        nb = t["neighbours"]
        if truncates and not p["allow_truncate_replication"]:
            for pub in nb["publications"]:
                if not pub["truncate"]:
                    what = ", ".join(k for k in ("insert", "update", "delete") if pub[k]) or "nothing"
                    refuse.append(
                        '%s is in publication "%s"%s, which publishes %s but not TRUNCATE: the strategy replace '
                        "empties the table with TRUNCATE and re-inserts the kept rows, so its subscribers would keep "
                        "every removed row and receive the kept rows a second time. %s"
                        % (qname, pub["name"], " (FOR ALL TABLES)" if pub["all_tables"] else "", what,
                           TRUNCATE_WAY_OUT))
            for sub in nb["subscriptions"] or []:
                refuse.append(
                    '%s is written by subscription "%s" (state %s): its rows come from a publisher, and the strategy '
                    "replace re-inserts them under new row versions the publisher knows nothing of. Deduplicate on "
                    "the publisher (with preflight_strategy=delete there the DELETEs reach this copy), or %s"
                    % (qname, sub["name"], sub["state"], TRUNCATE_WAY_OUT[0].lower() + TRUNCATE_WAY_OUT[1:]))
        if nb["subscriptions_unknown"] and truncates and not p["allow_truncate_replication"]:
            warn.append("could not read the subscriptions of %s (%s): check pg_subscription_rel yourself"
                        % (qname, nb["subscriptions_unknown"]))
        if deletes:
            for sub in nb["subscriptions"] or []:
                warn.append('%s is written by subscription "%s": the publisher still has the removed rows; a '
                            "duplicate it sends later breaks the new UNIQUE constraint and stops that subscription. "
                            "Deduplicate the publisher too." % (qname, sub["name"]))
            publishers = [pub["name"] for pub in nb["publications"] if pub["delete"]]
            if publishers and not nb["replica_identity"]["usable"]:
                ri = nb["replica_identity"]
                refuse.append(
                    '%s is published with deletes by %s but has no usable replica identity (REPLICA IDENTITY %s%s): '
                    'PostgreSQL itself would fail the DELETE (the table "does not have a replica identity and '
                    'publishes deletes"). Run ALTER TABLE %s REPLICA IDENTITY FULL (or USING '
                    "INDEX on a unique index of NOT NULL columns) first."
                    % (qname, ", ".join('"%s"' % n for n in publishers), ri["mode"].upper(),
                       "" if ri["has_primary_key"] else ", no primary key", qname))
        rules = [r for r in nb["rules"] if r["enabled"] != "D"]
        if rules:
            refuse.append(
                "%s has rewrite rules that would divert the migration's INSERT or DELETE: %s. Drop them, or disable "
                "them for the run (ALTER TABLE %s DISABLE RULE <name>; ENABLE RULE afterwards), or leave the table "
                "out of dedup_tables."
                % (qname, "; ".join('"%s" (ON %s%s: %s)' % (r["name"], r["event"], " DO INSTEAD" if r["instead"]
                                                            else "", r["definition"].strip()) for r in rules),
                   qname))
    if truncates and not p["allow_truncate_replication"] and slots:
        refuse.append(
            "database %s has logical replication slots %s: a logical decoding consumer (Debezium, a subscription, "
            "pglogical, ...) receives the changes of the managed tables, and many skip TRUNCATE (Debezium does by "
            "default), so with the strategy replace it would keep every removed row and receive the kept rows a "
            "second time. %s" % (database, ", ".join(
                '"%s" (plugin %s, %s)' % (s["name"], s["plugin"], "active pid %s" % s["active_pid"] if s["active"]
                                          else "inactive") for s in slots), TRUNCATE_WAY_OUT))
    if slots_unknown and truncates and not p["allow_truncate_replication"]:
        warn.append("could not read pg_replication_slots (%s): check for logical slots yourself" % slots_unknown)
    strangers = []
    if owners["schema_owner"] is not None and owners["schema_owner"] != owners["current_user"]:
        strangers.append('the schema "%s" is owned by role "%s"' % (p["backup_schema"], owners["schema_owner"]))
    for rel, owner in sorted(owners["tables"].items()):
        if owner != owners["current_user"]:
            strangers.append('the table "%s"."%s" is owned by role "%s"' % (p["backup_schema"], rel, owner))
    if strangers:
        refuse.append(
            "the ledger schema dedup_backup_schema=%s already exists and is not this tool's: %s, not by %s (the "
            "connecting role, dedup_db_user). Rollback trusts its runs and table_runs, so it is not adopted. Drop "
            "or rename it, set dedup_backup_schema to a schema that does not exist yet, or, if you trust its "
            "contents, make %s its owner (ALTER SCHEMA/TABLE ... OWNER TO %s)."
            % (p["backup_schema"], "; ".join(strangers), owners["current_user"], owners["current_user"],
               owners["current_user"]))
    return refuse, warn


def planning_failed(stage, error, p):
    """What was being planned when an unexpected error came, and what to check; nothing was changed (read-only)."""
    db = p.get("login_db") or "the database"
    user = p.get("login_user") or "the connecting role"
    if stage.startswith("table:"):
        table = "%s.%s" % (p.get("schema"), stage[len("table:"):])
        what = "reading the catalog and statistics of %s (columns, keys, triggers, sizes, duplicates)" % table
        check = ("that %s can read %s (SELECT, USAGE on schema %s) and that its dedup_tables entry (natural_key, "
                 "order_by) names columns of a plain table" % (user, table, p.get("schema")))
    elif stage == "ledger":
        what = "reading the ledger %s.runs / table_runs of earlier runs" % p.get("backup_schema")
        check = ("that %s owns or can read schema %s (dedup_backup_schema), and that nothing else created tables "
                 "of those names there" % (user, p.get("backup_schema")))
    elif stage == "server":
        what = "reading the server's settings (version, recovery, privileges, database size)"
        check = "that %s may connect to %s and read pg_settings / pg_database" % (user, db)
    elif stage == "neighbours":
        what = "looking for logical replication slots, publications and the ledger's owner"
        check = "that %s can read pg_replication_slots and pg_publication_tables (or run as the tables' owner)" % user
    else:
        what = "connecting"
        check = "the dedup_db_* connection settings"
    return ("planning the deploy failed while %s in %s: %s. Nothing was changed (planning only reads). Check %s; "
            "then re-run." % (what, db, error, check))


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        schema=dict(type="str", required=True),
        tables=dict(type="list", elements="dict", required=True),
        backup_schema=dict(type="str", default="dedup_rollout"),
        run_id=dict(type="str", required=True),
        resume=dict(type="bool", default=True),
        strategy=dict(type="str", default="replace", choices=["replace", "delete"]),
        mode=dict(type="str", default="offline", choices=["offline", "online"]),
        check_neighbours=dict(type="bool", default=False),
        allow_truncate_replication=dict(type="bool", default=False),
        wait_for_idle=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    if not p["tables"]:
        module.fail_json(msg="dedup_tables is empty: name at least one table and its natural key")
    stage = "connecting"
    try:
        validate_identifier(p["schema"], "schema", module)
        validate_identifier(p["backup_schema"], "backup schema", module)
        conn = connect(module, autocommit=False, readonly=True)
        cur = conn.cursor()
        stage = "sessions"
        busy = busy_sessions(cur)
        if busy and p["wait_for_idle"]:
            # An interrupted run's statement may hold the tables' locks until its transaction ends: no plan now.
            conn.rollback()
            conn.close()
            module.exit_json(changed=False, busy_sessions=busy, deploy_id=None, resumed=False, server=None,
                             ledger=None, tables=[], slots=[], slots_unknown=False,
                             msg="%d session(s) of an interrupted dedup-rollout run still working: no plan yet"
                                 % len(busy))
        stage = "server"
        server = _server(cur)
        server["dump_unreadable"] = dump_unreadable_of(cur, p["backup_schema"])
        stage = "ledger"
        ledger, deploy_id, resumed = _ledger(cur, p["backup_schema"], p["run_id"], p["resume"])
        seen = set()
        tables = []
        for spec in p["tables"]:
            if spec.get("name") in seen:
                module.fail_json(msg='table "%s" is listed twice in dedup_tables' % spec.get("name"))
            seen.add(spec.get("name"))
            stage = "table:%s" % spec.get("name")
            tables.append(_plan_table(module, cur, p["schema"], spec, p["strategy"], deploy_id,
                                      ledger["table_status"]))
        stage = "neighbours"
        slots, slots_unknown = logical_slots(cur)
        ledger["owners"] = Ledger(p["backup_schema"]).owners(cur)
        refuse, warn = _refusals(p, server["database"], tables, slots, slots_unknown, ledger["owners"])
        conn.rollback()
        conn.close()
    except DedupPgError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # noqa: BLE001 - report any driver error readably
        module.fail_json(msg=planning_failed(stage, error_text(exc, module), p), exception=traceback.format_exc())
    if p["check_neighbours"]:
        for w in warn:
            module.warn(w)
        if refuse:
            module.fail_json(msg="Nothing was changed: " + " | ".join(refuse), refusals=refuse)
    module.exit_json(changed=False, busy_sessions=busy, deploy_id=deploy_id, resumed=resumed, server=server,
                     ledger=ledger, tables=tables, slots=slots, slots_unknown=slots_unknown)


if __name__ == "__main__":
    main()
