"""What one monitoring check found (roles/monitor/tasks/result.yml) and the tables of the scheduled check
(roles/monitor/tasks/schedule.yml). Pure Python, no Ansible import (tests/unit/test_monitor_filter.py).

    {{ monitor__dups.tables | monitor_findings(monitor__constraints.results, monitor__sizes, etl_states) }}
        -> {clean, problems, duplicate_rows, missing_constraints, database_size, backup_schema_bytes, tables, etl}
    {{ dedup_tables | monitor_schedule_tables(ledger_tables) }}
        -> [{name, natural_key, constraint}] for the scheduled check's configuration
    {{ dedup_tables | monitor_constraint_checks(dedup_schema) }}
        -> pg_unique_constraint's constraints (one check-mode call for every table)
"""

from __future__ import annotations

import json


def _int(value) -> int:
    """Jinja's ``int`` filter: a number or numeric text as an int, anything else 0."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return 0


def _first(items, key, value, what: str) -> dict:
    for item in items or []:
        if key(item) == value:
            return item
    raise ValueError(f"no {what} for table {value!r}")


def monitor_findings(dups: list, constraints: list, sizes: dict, etl: list | None = None) -> dict:
    """One check's findings from the module results of roles/monitor:

    ``dups``: ``pg_duplicates`` ``tables``; ``constraints``: the ``results`` of ``pg_unique_constraint`` over
    dedup_tables (list mode: each names its ``table``; a loop's: ``item.name``; check mode: action ``none`` means a
    valid constraint is in place); ``sizes``: the
    ``pg_monitor action=sizes`` result; ``etl``: the ``monitor_etl`` facts of the ETL hosts that have one.

    One problem sentence per table with duplicate rows, per table without a valid UNIQUE constraint, then the ETL
    hosts' own problems; ``clean`` when there is none.
    """
    tables: list[dict] = []
    problems: list[str] = []
    for d in dups or []:
        c = _first(constraints, lambda r: r.get("table") or (r.get("item") or {}).get("name"), d["table"],
                   "constraint check")
        s = _first(sizes.get("tables"), lambda r: r.get("table"), d["table"], "size")
        present = c["action"] == "none"
        samples = d.get("sample_duplicate_keys", [])
        tables.append({
            "table": d["table"], "schema": d["schema"], "natural_key": d["natural_key"],
            "total_rows": d["total_rows"], "duplicate_rows": d["duplicate_rows"],
            "duplicate_groups": d["duplicate_groups"], "sample_duplicate_keys": samples,
            "constraint": c["name"], "constraint_present": present,
            "constraint_valid": c["existing"]["valid"] if c.get("existing") else False,
            "constraint_action": c["action"], "bytes": s["bytes"],
        })
        where = f"{d['schema']}.{d['table']}"
        if _int(d["duplicate_rows"]) > 0:
            problems.append(f"{where}: {d['duplicate_rows']} duplicate rows in {d['duplicate_groups']} keys "
                            f"(sample {json.dumps(samples)})")
        if not present:
            why = ("only an INVALID index left by a failed build" if c["action"] == "rebuilt_invalid_index"
                   else "none found")
            problems.append(f"{where}: no valid UNIQUE constraint on ({', '.join(map(str, d['natural_key']))}) "
                            f"(expected {c['name']}; {why})")
    etl = list(etl or [])
    for e in etl:
        problems.extend(e["problems"])
    return {
        "clean": not problems,
        "problems": problems,
        "duplicate_rows": sum(_int(t["duplicate_rows"]) for t in tables),
        "missing_constraints": [t["table"] for t in tables if not t["constraint_present"]],
        "database_size": sizes["database_size"],
        "backup_schema_bytes": sizes["backup_schema_bytes"],
        "tables": tables,
        "etl": etl,
    }


def monitor_schedule_tables(tables: list, ledger_tables: list) -> list[dict]:
    """The scheduled check's tables: each of dedup_tables with the constraint the deploy recorded for it in the
    ledger (``pg_monitor action=watch`` ``tables``, the same rows as ``pg_ledger action=read``; '' when the
    ledger names none)."""
    out = []
    for t in tables or []:
        rows = [r for r in ledger_tables or [] if r.get("table_name") == t["name"]]
        out.append({"name": t["name"], "natural_key": t["natural_key"],
                    "constraint": rows[0]["constraint_name"] if rows and rows[0].get("constraint_name") else ""})
    return out


def monitor_constraint_checks(tables: list, schema: str) -> list[dict]:
    """dedup_tables as pg_unique_constraint list-mode elements (schema, table, columns) for the catalog check."""
    return [{"schema": schema, "table": t["name"], "columns": list(t["natural_key"])} for t in tables or []]


class FilterModule:
    def filters(self):
        return {"monitor_findings": monitor_findings, "monitor_schedule_tables": monitor_schedule_tables,
                "monitor_constraint_checks": monitor_constraint_checks}
