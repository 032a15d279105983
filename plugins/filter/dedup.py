"""Jinja2 filters for the SQL templates in sql/.

Identifiers are validated (names that look like SQL are refused) and quoted the way
``psycopg2.sql.Identifier`` / PostgreSQL's ``quote_ident`` do: always double-quoted, inner quotes doubled.
Literals are quoted like ``psycopg2.sql.Literal`` for strings (standard_conforming_strings).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ansible.errors import AnsibleFilterError

# The identifier rule is module_utils/dedup_ident.py's, the one the modules apply (validate_identifier). A
# controller-side plugin cannot import the project's module_utils as ansible.module_utils.* (that path exists
# only inside a module's payload), so the file is loaded by its path in this checkout.
_spec = importlib.util.spec_from_file_location(
    "dedup_rollout_ident", Path(__file__).resolve().parents[2] / "module_utils" / "dedup_ident.py")
_ident = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ident)


def pg_ident(name, what="identifier"):
    """Validate and double-quote one identifier."""
    problem = _ident.identifier_problem(name)
    if problem is not None:
        if problem[0] == "empty":
            raise AnsibleFilterError(f"dedup: empty or non-string {what}: {name!r}")
        if problem[0] == "long":
            raise AnsibleFilterError(f"dedup: {what} {name!r} is longer than PostgreSQL's "
                                     f"{_ident.MAX_IDENTIFIER_BYTES}-byte limit")
        raise AnsibleFilterError(
            f"dedup: {what} {name!r} looks like SQL (contains ; -- /* */ or a control character); refused"
        )
    return '"' + name.replace('"', '""') + '"'


def pg_qident(parts):
    """Schema-qualified name: ['s', 't'] -> "s"."t"."""
    if isinstance(parts, str):
        parts = [parts]
    return ".".join(pg_ident(p) for p in parts)


def pg_idents(names, prefix=""):
    """Comma-separated quoted identifiers, optionally qualified by a table alias."""
    pre = (prefix + ".") if prefix else ""
    return ", ".join(pre + pg_ident(n) for n in names)


def pg_literal(value):
    """A SQL literal for str/int/float/bool/None."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    if "\x00" in s:
        raise AnsibleFilterError("dedup: NUL byte in a SQL literal")
    return "'" + s.replace("'", "''") + "'"


def pgpass_escape(value):
    """Escape a .pgpass field (backslash and colon)."""
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def dedup_dup_spec(table):
    """A dedup_tables entry reduced to what pg_duplicates takes."""
    spec = {"name": table["name"], "natural_key": list(table["natural_key"])}
    if table.get("ignore_columns"):
        spec["ignore_columns"] = list(table["ignore_columns"])
    return spec


def dedup_constraint_checks(plan):
    """The plan's tables as pg_unique_constraint list-mode elements (schema, table, columns): what the validate role
    checks in check mode, catalog only."""
    return [{"schema": t["schema"], "table": t["table"], "columns": list(t["natural_key"])}
            for t in (plan or {}).get("tables") or []]


def dedup_project_root(_value=None):
    """The checkout this plugin belongs to (plugins/filter/ is two levels below it), whatever the roles path or
    working directory: AWX / Automation Platform put their own requirements_roles first in the roles path."""
    return str(Path(__file__).resolve().parents[2])


_ROLE_GROUPS = frozenset({"all", "ungrouped", "db", "etl"})


def dedup_region_hosts(host, groups, kind):
    """The hosts of group ``kind`` ('db' or 'etl') in ``host``'s region.

    A region is an inventory group other than all/ungrouped/db/etl that holds ``host`` and hosts of ``kind``
    (inventory/production: group ``nashville`` holds the Nashville db and etl hosts). When several such groups
    hold the host (a region inside an environment group), the smallest is the region. A host in no region group
    (a one-region inventory such as the lab) belongs with every host of ``kind``. The order is the inventory's.
    """
    if kind not in ("db", "etl"):
        raise AnsibleFilterError(f"dedup_region_hosts: kind must be 'db' or 'etl', not {kind!r}")
    members = list(groups.get(kind) or [])
    best = None
    for name, hosts in groups.items():
        if name in _ROLE_GROUPS or host not in (hosts or []):
            continue
        peers = [h for h in members if h in hosts]
        if peers and (best is None or len(hosts) < best[0]):
            best = (len(hosts), peers)
    return best[1] if best else members


def dedup_region_missing(host, groups, hostvars, kind, fact):
    """The hosts of group ``kind`` in ``host``'s region (dedup_region_hosts) that have no ``fact`` set: the region's
    gates in deploy_dedup.yml (an etl host whose pause never set dedup_etl_ready, a db host without dedup_db_ready,
    an etl host without dedup_etl_done)."""
    return [h for h in dedup_region_hosts(host, groups, kind) if fact not in (hostvars.get(h) or {})]


def dedup_region_name(host, groups):
    """The name of ``host``'s region group (see dedup_region_hosts), or '' when it is in none."""
    best = None
    for name, hosts in groups.items():
        if name in _ROLE_GROUPS or host not in (hosts or []):
            continue
        if any(h in hosts for h in (groups.get("db") or []) + (groups.get("etl") or [])) and \
                (best is None or len(hosts) < best[0]):
            best = (len(hosts), name)
    return best[1] if best else ""


class FilterModule:
    def filters(self):
        return {
            "dedup_project_root": dedup_project_root,
            "dedup_region_hosts": dedup_region_hosts,
            "dedup_region_name": dedup_region_name,
            "dedup_region_missing": dedup_region_missing,
            "pg_ident": pg_ident,
            "pg_qident": pg_qident,
            "pg_idents": pg_idents,
            "pg_literal": pg_literal,
            "dedup_dup_spec": dedup_dup_spec,
            "dedup_constraint_checks": dedup_constraint_checks,
            "pgpass_escape": pgpass_escape,
        }
