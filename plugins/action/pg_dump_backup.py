"""Action plugin for pg_dump_backup: a dump of a big database prints the bytes written so far every N seconds.

Long when the database (``preflight_plan.server.database_size``; unknown = long) is at least
``dedup_progress_min_size``; the estimate printed is that size x ``preflight_dump_size_factor`` (0.6 unless set).
Shared mechanism: plugins/action/dedup_progress.py.
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
        if (args.get("action") or "dump") != "dump":
            return None
        size = self.fact(task_vars, "preflight_plan", "server", "database_size")
        try:
            factor = float(self.fact(task_vars, "preflight_dump_size_factor", default=0.6))
        except (TypeError, ValueError):
            factor = 0.6
        reader = {"kind": "dump", "path": args.get("path") or "",
                  "estimate_bytes": int(int(size) * factor) if size is not None else 0}
        return self.standard_plan(task_vars, size, self.size_setting(task_vars, "dedup_progress_min_size"), reader)
