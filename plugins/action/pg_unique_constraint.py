"""Action plugin for pg_unique_constraint: building the UNIQUE index of a big table prints its phase and blocks.

Long when ``state=present`` and the table (its ``heap_size`` in ``preflight_plan.tables``; unknown = long) is at
least ``dedup_progress_min_size``. The reader shows ``pg_stat_progress_create_index`` (phase, blocks, tuples) or
the lock the DDL waits for. Shared mechanism: plugins/action/dedup_progress.py.
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
        schema, table = args.get("schema") or "public", args.get("table")
        size = None
        for t in self.fact(task_vars, "preflight_plan", "tables", default=None) or []:
            if isinstance(t, dict) and t.get("schema") == schema and t.get("table") == table:
                size = t.get("heap_size", t.get("size_before"))
        reader = {"kind": "index", "schema": schema, "table": table}
        return self.standard_plan(task_vars, size, self.size_setting(task_vars, "dedup_progress_min_size"), reader)
