"""Ansible callback for the benchmark: wall time of every task, written as JSON at the end.

Enabled only by bench/run_bench.py (ANSIBLE_CALLBACK_PLUGINS + ANSIBLE_CALLBACKS_ENABLED=bench_timer),
next to the normal stdout callback. Output file: $BENCH_TIMER_FILE. Records task names and seconds
only, never results or variables.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bench_timer
type: aggregate
short_description: per-task wall time for bench/run_bench.py
description: Writes the wall time of each task (names and seconds only) to $BENCH_TIMER_FILE.
requirements: [enable in the callbacks_enabled setting]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._t0 = time.monotonic()
        self._tasks: list[dict] = []
        self._current: dict | None = None

    def _close(self) -> None:
        if self._current is not None:
            self._current["seconds"] = round(time.monotonic() - self._current.pop("start"), 3)
            self._tasks.append(self._current)
            self._current = None

    def _open(self, task) -> None:
        self._close()
        self._current = {"name": task.get_name(), "start": time.monotonic()}

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._open(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._open(task)

    def v2_playbook_on_stats(self, stats):
        self._close()
        path = os.environ.get("BENCH_TIMER_FILE")
        if not path:
            return
        with open(path, "w") as fh:
            json.dump({"total_seconds": round(time.monotonic() - self._t0, 3), "tasks": self._tasks}, fh)
