"""The migrate role's one decision that both of its paths (offline constraints, online guard) take. Pure Python
(tests/unit/test_migrate_filter.py).

    {{ item | migrate_nulls_not_distinct(migrate_nulls_not_distinct, preflight_plan.server.version_num) }}
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


class FilterModule:
    def filters(self):
        return {"migrate_nulls_not_distinct": migrate_nulls_not_distinct}
