"""The migrate role's decisions, pure Python (tests/unit/test_migrate_filter.py).

    {{ item | migrate_nulls_not_distinct(migrate_nulls_not_distinct, preflight_plan.server.version_num) }}
    {{ preflight_plan | migrate_constraints(preflight_dedup_tables, migrate_nulls_not_distinct, record) }}
"""

from __future__ import annotations


def migrate_nulls_not_distinct(table: dict, setting, version_num) -> bool:
    """Whether the table's UNIQUE constraint treats NULLs as equal.

    An equivalent constraint that exists already keeps its own setting. Otherwise ``auto`` means: when a key column
    is nullable and the server can (PostgreSQL 15+, ``NULLS NOT DISTINCT``), so that rows with a NULL in the key
    cannot be duplicated again; ``true``/``false`` force it."""
    existing = table.get("existing_constraint")
    if existing:
        return bool(existing.get("nulls_not_distinct"))
    if str(setting).lower() == "auto":
        return bool(table.get("key_nullable")) and int(version_num or 0) >= 150000
    return str(setting).lower() in ("true", "yes", "1", "on")


def migrate_constraints(plan: dict, dedup_tables, setting, record=True) -> list:
    """The ``constraints`` of pg_unique_constraint's list mode for every table of the plan, in its order.

    With ``record`` (not in check mode), each element asks the module to write the table's ledger row: when it
    creates the constraint, and always (``record_always``) for a table deduplicated in this run (``dedup_tables``)
    or already in the deploy's ledger."""
    version = (plan.get("server") or {}).get("version_num")
    out = []
    for t in plan.get("tables") or []:
        element = {"schema": t["schema"], "table": t["table"], "columns": list(t["natural_key"]),
                   "nulls_not_distinct": migrate_nulls_not_distinct(t, setting, version)}
        if record:
            element["record"] = {"natural_key": list(t["natural_key"]), "keep": t.get("keep"),
                                 "order_by": t.get("order_by")}
            element["record_always"] = t["table"] in (dedup_tables or []) or t.get("ledger") is not None
        out.append(element)
    return out


class FilterModule:
    def filters(self):
        return {"migrate_nulls_not_distinct": migrate_nulls_not_distinct, "migrate_constraints": migrate_constraints}
