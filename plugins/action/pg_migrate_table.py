"""Action plugin for pg_migrate_table: run a big table's migration in the background and show its progress.

With ``progress_interval`` > 0 (the migrate role sets it when a table of the call is ``migrate_progress_min_size`` or
more) and not in check mode, the module runs under Ansible's async wrapper and every ``progress_interval`` seconds
``pg_migrate_progress`` says where the migration's session is (step, seconds, lock waits, index build counters):
the shared mechanism of plugins/action/dedup_progress.py. Without it, the module runs as usual.
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
connection_options = _progress().connection_options  # what goes on to pg_migrate_progress (tests/unit)


class ActionModule(ProgressAction):
    def progress_plan(self, args, task_vars):
        interval = float(args.get("progress_interval") or 0)
        if interval <= 0:
            return None
        reader = {"kind": "migrate", "run_id": args.get("run_id") or ""}
        if args.get("tables"):
            # many tables in one call: the reader follows whichever of them the module is working on
            reader["tables"] = [[t.get("schema"), t.get("table")] for t in args["tables"]]
        else:
            reader.update(schema=args["schema"], table=args["table"])
        return {"interval": interval, "timeout": int(args.get("progress_timeout") or 86400), "reader": reader}
