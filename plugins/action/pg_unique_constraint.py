"""Action plugin for pg_unique_constraint: building the UNIQUE index of a big table prints its phase and blocks.

Long when ``state=present`` and the table (its ``heap_size`` in ``preflight_plan.tables``, or its size after the
deduplication of this run, ``size_after`` in ``migrate__applied``; unknown = long) is at least
``dedup_progress_min_size``; in list mode (``constraints``) when any of its tables is. The reader shows
``pg_stat_progress_create_index`` (phase, blocks, tuples) or the lock the DDL waits for: of the table, or in list
mode of whichever of the tables is being built (``pg_migrate_progress`` kind=index with ``tables``). Shared
mechanism: plugins/action/dedup_progress.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _progress():
    """plugins/action/dedup_progress.py, loaded once by its path (shared with the other progress plugins)."""
    name = "dedup_action_progress"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("dedup_progress.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


ProgressAction = _progress().ProgressAction


class ActionModule(ProgressAction):
    def progress_plan(self, args, task_vars):
        if (args.get("state") or "present") != "present":
            return None
        default_schema = args.get("schema") or "public"
        elements = args.get("constraints")
        if elements:
            pairs = [[(e.get("schema") or default_schema), e.get("table")] for e in elements if isinstance(e, dict)]
        else:
            pairs = [[default_schema, args.get("table")]]
        if not pairs:
            return None
        sizes = {}
        for t in self.fact(task_vars, "preflight_plan", "tables", default=None) or []:
            if isinstance(t, dict):
                sizes[(t.get("schema"), t.get("table"))] = t.get("heap_size", t.get("size_before"))
        # A table this run deduplicated is measured again after it (pg_migrate_table's size_after, the whole
        # relation): the index is built over what is left, not over the duplicates the plan measured.
        applied = task_vars.get("migrate__applied")
        for r in (applied.get("results") if isinstance(applied, dict) else None) or []:
            if isinstance(r, dict) and r.get("changed") and isinstance(r.get("size_after"), int):
                sizes[(r.get("schema"), r.get("table"))] = r["size_after"]
        known = [sizes.get((s, t)) for s, t in pairs]
        size = None if any(v is None for v in known) else max(int(v) for v in known)  # unknown = long
        if elements:
            reader = {"kind": "index", "tables": pairs}
        else:
            reader = {"kind": "index", "schema": pairs[0][0], "table": pairs[0][1]}
        return self.standard_plan(task_vars, size, self.size_setting(task_vars, "dedup_progress_min_size"), reader)
