"""Action plugin for pg_restore_rows: putting back many rows prints what the restore is doing every N seconds.

Long when ``rows_removed`` (unknown = long) is at least ``dedup_progress_min_rows`` and it is not C(verify_only).
The reader shows the rows read from the dump so far (``pg_stat_progress_copy``), or the insert of the removed rows
and how long it runs, and any lock it waits for. Shared mechanism: plugins/action/dedup_progress.py.
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
        if self._templar.template(args.get("verify_only")) in (True, "true", "True", "yes"):
            return None
        rows = args.get("rows_removed")
        try:
            rows = int(rows) if rows is not None else None
        except (TypeError, ValueError):
            rows = None
        reader = {"kind": "restore", "schema": args.get("schema"), "table": args.get("table"),
                  "rows": rows if rows is not None else -1}
        return self.standard_plan(task_vars, rows, int(self.setting(task_vars, "dedup_progress_min_rows") or 0),
                                  reader)
