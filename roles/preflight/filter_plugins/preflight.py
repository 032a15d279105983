"""Disk space the migration needs in the data directory (roles/preflight/tasks/disk.yml). Pure Python, no
Ansible import (tests/unit/test_disk_filter.py).

    {{ preflight_plan.tables | preflight_data_bytes(preflight__dups.tables, dedup_backup_mode) }}  -> bytes (int)
"""

from __future__ import annotations


def _int(value) -> int:
    """Jinja's ``int`` filter: a number or numeric text as an int (floats truncated), anything else 0."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return 0


def preflight_data_bytes(plan_tables: list, dups: list, backup_mode: str) -> int:
    """Bytes the migration writes into the data directory, summed over the tables that have duplicates.

    ``plan_tables``: the ``tables`` of the pg_dedup_plan result (``table``, ``heap_size``, ``size_before``);
    ``dups``: the ``tables`` of the pg_duplicates result (``table``, ``total_rows``, ``duplicate_rows``).

    Per table, with ``removed`` the share of its rows that are duplicates and ``kept`` the rest: its heap times
    (``removed``, the backup table, in backup mode "table" only; plus 2 x ``kept``, the kept rows stashed and
    re-inserted), plus its indexes and TOAST (size_before - heap_size) times ``kept``, rebuilt. A table without
    duplicates is not rewritten and needs nothing. Truncated to whole bytes at the end.
    """
    total = 0
    for t in plan_tables or []:
        d = next((d for d in dups or [] if d.get("table") == t["table"]), None)
        if d is None:
            raise ValueError(f"no duplicate count for table {t['table']!r}")
        rows, duplicates = _int(d["total_rows"]), _int(d["duplicate_rows"])
        if rows > 0 and duplicates > 0:
            removed = duplicates / rows
            kept = 1 - removed
            heap = _int(t["heap_size"])
            total = (total + heap * ((removed if backup_mode == "table" else 0) + 2 * kept)
                     + (_int(t["size_before"]) - heap) * kept)
    return _int(total)


class FilterModule:
    def filters(self):
        return {"preflight_data_bytes": preflight_data_bytes}
