"""What a rollback must undo per table (roles/restore/tasks/plan.yml). Pure Python, no Ansible import
(tests/unit/test_restore_filter.py).

    {{ restore__target_ledger.tables | default([]) | restore_tables_to_undo }}
        -> the ledger rows of the deploy's deduplicated/constrained tables, each with
           drop_constraint, constraint_inferred and needs_rows added
"""

from __future__ import annotations

import hashlib

TO_UNDO = ("deduplicated", "constrained")


def restore_default_constraint_name(table: str, natural_key: list) -> str:
    """The name pg_unique_constraint gives a constraint it creates: <table>_<key columns>_key; when longer than
    63 bytes (PostgreSQL's NAMEDATALEN - 1), its first 54 bytes (whole characters only) plus '_' and 8 hex digits
    of its sha1. Byte for byte module_utils/dedup_pg.py's fit_name, which names the constraint."""
    name = f"{table}_{'_'.join(map(str, natural_key))}_key"
    raw = name.encode("utf-8")
    if len(raw) <= 63:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    return f"{raw[:63 - len(digest) - 1].decode('utf-8', 'ignore')}_{digest}"


def restore_tables_to_undo(tables: list) -> list[dict]:
    """The tables of a deploy's ledger (``pg_ledger action=read`` ``tables``) that a rollback must undo, those in
    status deduplicated or constrained, each with:

    - ``needs_rows``: rows were removed, so they must be put back from the backup;
    - ``drop_constraint``: the constraint to drop: the one the deploy recorded creating; else, for a table
      deduplicated with rows removed whose deploy stopped before recording the constraint, the name the
      deploy would have given it; else None (a constraint that was already there stays);
    - ``constraint_inferred``: drop_constraint is that inferred name.
    """
    out = []
    for t in tables or []:
        if t.get("status") not in TO_UNDO:
            continue
        removed = t.get("rows_removed") or 0
        recorded = bool(t.get("constraint_created") and t.get("constraint_name"))
        inferred = not recorded and t["status"] == "deduplicated" and removed > 0
        if recorded:
            drop = t["constraint_name"]
        elif inferred:
            drop = restore_default_constraint_name(t["table_name"], t["natural_key"])
        else:
            drop = None
        out.append({**t, "drop_constraint": drop, "constraint_inferred": inferred, "needs_rows": removed > 0})
    return out


class FilterModule:
    def filters(self):
        return {"restore_tables_to_undo": restore_tables_to_undo}
