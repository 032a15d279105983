"""dedup_write_report: write a run's report.json and report.md on the controller, in one task.

The report roles (roles/report, roles/rollback_report) used three tasks for it - the directory, then
``ansible.builtin.copy`` of the JSON and ``ansible.builtin.template`` of the Markdown, each a module run on the
controller (about 0.6 s apiece here, 1.7 s of a 25 s no-op re-run). This action does what they did, without a module:
the directory and its missing parents owner-only (0700), both files 0600, written atomically and only when their text
changed; the JSON as ``to_nice_json`` writes it plus a newline; the Markdown rendered from the role's template with
the task's variables and ``ansible.builtin.template``'s defaults (trim_blocks on, ``\\n``). It runs in check mode too
(the report of a check run says so), as the tasks did with ``check_mode: false``; ``changed`` is always false (a
report is not a change to any system).

Options (task arguments):
  dest_dir   the run's report directory (on the controller)
  data       the report (a dict): report.json
  template   the Markdown template, found like ``ansible.builtin.template``'s src (the role's templates/)

Returns ``json`` and ``markdown`` (the paths) and ``written`` (how many files changed).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.plugins.filter.core import to_nice_json
from ansible.template import trust_as_template


def _files():
    """plugins/action/dedup_files.py (owner-only directories, atomic writes), loaded once by its path."""
    name = "dedup_action_files"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("dedup_files.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _requires_connection = False
    _VALID_ARGS = frozenset(("dest_dir", "data", "template"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        args = self._task.args
        dest_dir, data, template = args.get("dest_dir"), args.get("data"), args.get("template")
        if not dest_dir or not template:
            raise AnsibleActionFail("dedup_write_report needs dest_dir and template")
        if not isinstance(data, dict):
            raise AnsibleActionFail("dedup_write_report: data must be a dict (the report)")
        try:
            src = self._find_needle("templates", template)
            text = trust_as_template(self._loader.get_text_file_contents(src))
        except Exception as exc:  # noqa: BLE001 - the file's own error, named
            raise AnsibleActionFail(f"dedup_write_report: cannot read the template {template}: {exc}") from exc
        templar = self._templar.copy_with_new_env(searchpath=[os.path.dirname(src)],
                                                  available_variables=dict(task_vars or {}))
        markdown = templar.template(text, escape_backslashes=False,
                                    overrides={"trim_blocks": True, "lstrip_blocks": False,
                                               "newline_sequence": "\n"}) or ""
        files = _files()
        files.make_private_dirs(dest_dir)
        paths = {"json": os.path.join(dest_dir, "report.json"), "markdown": os.path.join(dest_dir, "report.md")}
        written = files.write_if_changed(paths["json"], to_nice_json(data) + "\n")
        written += files.write_if_changed(paths["markdown"], markdown)
        result.update(changed=False, written=written, **paths,
                      msg=f"report written to {dest_dir} ({written} file(s) changed)")
        return result
