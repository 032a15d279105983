"""The one progress mechanism of dedup-rollout's long-running modules (not a task action of its own).

A module whose work may be long gets a small action plugin of its own name (pg_migrate_table, pg_dump_backup,
pg_unique_constraint, pg_restore_rows) whose ``ActionModule`` subclasses :class:`ProgressAction` (this file,
loaded by its path: a controller plugin cannot import its neighbours by name) and says, in
:meth:`ProgressAction.progress_plan`, whether this call is expected to be long and what ``pg_migrate_progress``
should look at (its ``kind``: migrate, dump, index or restore). When it is, the module runs under Ansible's own
async wrapper and, every ``interval`` seconds, the controller runs ``pg_migrate_progress`` (read-only) and prints
its one-line ``msg`` prefixed with the host; the task ends with the module's own result, exactly as if it had run
in the foreground. Otherwise (short work, check mode, an explicit ``async:``, no interval) the module runs as usual.

Thresholds come from the shared variables (roles/dedup_common): ``dedup_progress_interval``,
``dedup_progress_min_size`` (bytes of the database or table), ``dedup_progress_min_rows`` (rows to put back)
and ``dedup_progress_timeout``.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import yaml
from ansible.module_utils.common.text.formatters import human_to_bytes
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash

display = Display()

ASYNC_KEYS = ("ansible_job_id", "started", "finished", "results_file", "stdout", "stderr", "stdout_lines",
              "stderr_lines", "erased")
FRAGMENT = Path(__file__).resolve().parents[1] / "doc_fragments" / "dedup_pg.py"
DEFAULTS = {"dedup_progress_interval": 10, "dedup_progress_min_size": "1GB", "dedup_progress_min_rows": 1000000,
            "dedup_progress_timeout": 86400}


@functools.lru_cache(maxsize=1)
def connection_options() -> frozenset:
    """Names and aliases of the connection options every DB module takes: the options of the doc fragment dedup_pg
    (plugins/doc_fragments; checked against module_utils/dedup_pg.py's pg_common_argument_spec() by the unit
    tests). Only these of a task's arguments (module_defaults merged in) go on to pg_migrate_progress."""
    spec = importlib.util.spec_from_file_location("dedup_pg_doc_fragment", FRAGMENT)
    fragment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fragment)
    options = yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]
    return frozenset(list(options) + [alias for doc in options.values() for alias in doc.get("aliases", [])])


class ProgressAction(ActionBase):
    _supports_check_mode = True
    _supports_async = True

    # ------------------------------------------------------------------ per module

    def progress_plan(self, args: dict, task_vars: dict) -> dict | None:
        """``{"interval": s, "timeout": s, "reader": {pg_migrate_progress args without connection}}`` when this
        call is expected to be long, else None (run in the foreground)."""
        return None

    # ------------------------------------------------------------------ helpers for progress_plan

    def setting(self, task_vars: dict, name: str):
        """A shared variable, templated (role defaults arrive raw), or its default."""
        value = task_vars.get(name, DEFAULTS.get(name)) if task_vars else DEFAULTS.get(name)
        try:
            value = self._templar.template(value)
        except Exception:  # noqa: BLE001 - a bad value means the default, never a failed task
            value = DEFAULTS.get(name)
        return value

    def size_setting(self, task_vars: dict, name: str) -> int:
        value = self.setting(task_vars, name)
        try:
            return int(value) if str(value).strip().isdigit() else int(human_to_bytes(str(value)))
        except (TypeError, ValueError):
            return int(human_to_bytes(str(DEFAULTS[name])))

    def fact(self, task_vars: dict, *path, default=None):
        """task_vars[path[0]][path[1]]..., templated, or ``default``."""
        value = task_vars or {}
        for key in path:
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                return default
        try:
            return self._templar.template(value)
        except Exception:  # noqa: BLE001
            return default

    def standard_plan(self, task_vars: dict, expected, threshold: int, reader: dict) -> dict | None:
        """Background with progress when ``expected`` (bytes or rows; None = unknown, taken as long) reaches
        ``threshold`` and the interval is positive."""
        try:
            interval = float(self.setting(task_vars, "dedup_progress_interval") or 0)
        except (TypeError, ValueError):
            interval = 0.0
        if interval <= 0 or (expected is not None and int(expected) < threshold):
            return None
        return {"interval": interval, "timeout": int(self.setting(task_vars, "dedup_progress_timeout") or 86400),
                "reader": reader}

    # ------------------------------------------------------------------ the mechanism

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        args = self._task.args
        plan = None
        if not (self._task.check_mode or self._task.async_val or self._connection.has_native_async):
            plan = self.progress_plan(args, task_vars or {})
        if not plan:
            result = merge_hash(result, self._execute_module(task_vars=task_vars))
            self._remove_tmp_path(self._connection._shell.tmpdir)
            return result
        return merge_hash(result, self.run_with_progress(args, task_vars, plan))

    def run_with_progress(self, args: dict, task_vars: dict, plan: dict) -> dict:
        interval = float(plan["interval"])
        self._task.async_val = int(plan.get("timeout") or 86400)
        try:
            started = self._execute_module(task_vars=task_vars, wrap_async=True)
        finally:
            self._task.async_val = 0
        if started.get("failed") or not started.get("ansible_job_id"):
            return started
        jid = started["ansible_job_id"]
        async_dir = self._remote_expand_user(self.get_shell_option("async_dir", default="~/.ansible_async"))
        reader = {k: v for k, v in args.items() if k in connection_options()}
        reader.update(plan["reader"], wait=interval)
        host = task_vars.get("inventory_hostname", "?") if task_vars else "?"
        t0 = time.monotonic()
        while True:
            # The reader waits up to ``interval`` s and returns as soon as the work's session is gone. While it
            # reports the work running, the job cannot have finished: print and read again without asking the job
            # (each module run costs a task round trip); otherwise ask the job whether it is done.
            progress = self._execute_module(module_name="pg_migrate_progress", module_args=dict(reader),
                                            task_vars=task_vars)
            if progress.get("running"):
                display.display(f"[{host}] {progress.get('msg')} ({time.monotonic() - t0:.0f} s since start)")
                continue
            status = self._execute_module(module_name="ansible.legacy.async_status",
                                          module_args={"jid": jid, "_async_dir": async_dir}, task_vars=task_vars)
            if status.get("finished") or (status.get("failed") and "finished" not in status):
                break
            # not started yet, or between two tables or phases: a short pause (each round costs two module runs)
            time.sleep(min(interval, 0.25))
        self._execute_module(module_name="ansible.legacy.async_status",
                             module_args={"jid": jid, "mode": "cleanup", "_async_dir": async_dir},
                             task_vars=task_vars)
        for key in ASYNC_KEYS:
            status.pop(key, None)
        status["background"] = True
        return status


class ActionModule(ProgressAction):
    """Only so that the action loader finds a plugin in this file; no module is called dedup_progress."""
