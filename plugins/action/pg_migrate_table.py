"""Action plugin for pg_migrate_table: run a big table's migration in the background and show its progress.

With ``progress_interval`` > 0 (and not in check mode) the module is started under Ansible's own async
wrapper, and every ``progress_interval`` seconds the controller asks ``pg_migrate_progress`` where the
migration's session is (step, seconds, lock waits, index build counters) and prints one line; the task ends
with the module's own result, exactly as if it had run in the foreground. Without it, the module runs as usual.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import yaml
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash

display = Display()

FRAGMENT = Path(__file__).resolve().parents[1] / "doc_fragments" / "dedup_pg.py"
ASYNC_KEYS = ("ansible_job_id", "started", "finished", "results_file", "stdout", "stderr", "stdout_lines",
              "stderr_lines", "erased")


@functools.lru_cache(maxsize=1)
def connection_options() -> frozenset:
    """Names and aliases of the connection options every DB module takes, pg_migrate_table's among them: the
    options of the doc fragment dedup_pg (plugins/doc_fragments, beside this plugin; validate-modules checks it
    against module_utils/dedup_pg.py's pg_common_argument_spec()). Only these go on to pg_migrate_progress."""
    spec = importlib.util.spec_from_file_location("dedup_pg_doc_fragment", FRAGMENT)
    fragment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fragment)
    options = yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]
    return frozenset(list(options) + [alias for doc in options.values() for alias in doc.get("aliases", [])])


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        args = self._task.args
        interval = float(args.get("progress_interval") or 0)
        if interval <= 0 or self._task.check_mode or self._task.async_val or self._connection.has_native_async:
            result = merge_hash(result, self._execute_module(task_vars=task_vars))
            self._remove_tmp_path(self._connection._shell.tmpdir)
            return result

        self._task.async_val = int(args.get("progress_timeout") or 86400)
        try:
            started = self._execute_module(task_vars=task_vars, wrap_async=True)
        finally:
            self._task.async_val = 0
        if started.get("failed") or not started.get("ansible_job_id"):
            return merge_hash(result, started)
        jid = started["ansible_job_id"]
        async_dir = self._remote_expand_user(self.get_shell_option("async_dir", default="~/.ansible_async"))
        progress_args = {k: v for k, v in args.items() if k in connection_options()}
        progress_args.update(run_id=args.get("run_id") or "", schema=args["schema"], table=args["table"],
                             wait=interval)
        host = task_vars.get("inventory_hostname", "?") if task_vars else "?"
        t0 = time.monotonic()
        while True:
            progress = self._execute_module(module_name="pg_migrate_progress", module_args=dict(progress_args),
                                            task_vars=task_vars)
            status = self._execute_module(module_name="ansible.legacy.async_status",
                                          module_args={"jid": jid, "_async_dir": async_dir}, task_vars=task_vars)
            if status.get("finished") or (status.get("failed") and "finished" not in status):
                break
            if progress.get("running"):
                display.display(f"[{host}] {progress.get('msg')} ({time.monotonic() - t0:.0f} s since start)")
            else:
                time.sleep(min(interval, 2.0))  # between attempts or in the post-commit ANALYZE: no busy polling
        self._execute_module(module_name="ansible.legacy.async_status",
                             module_args={"jid": jid, "mode": "cleanup", "_async_dir": async_dir},
                             task_vars=task_vars)
        for key in ASYNC_KEYS:
            status.pop(key, None)
        status["background"] = True
        return merge_hash(result, status)
