"""dedup_render_sql: render one SQL template for many tables on the controller, in one task.

The migrate role used to render ``sql/migrate_table.sql.j2`` with one ``ansible.builtin.template`` call per table;
each call is a task round trip (about 0.9 s here) for a few milliseconds of Jinja. This action renders every table
with the same templar and options as ``ansible.builtin.template`` (trim_blocks on, lstrip_blocks off, ``\\n``), writes
each file into ``dest_dir`` on the controller (owner-only, atomically, rewritten only when its text changed) and returns
the texts, so the next task can hand them to ``pg_migrate_table`` without reading the files again. Directories it
creates are owner-only (0700), like the report directory.

Options (task arguments):
  src       the template (a path on the controller)
  dest_dir  the directory for the rendered files (on the controller; created owner-only when missing)
  tables    the plan entries to render; each is exposed to the template as ``t``
  vars      further variables for the template (run_id, lock_timeout, ...)

Returns ``tables``: per table ``schema``, ``table``, ``strategy`` and ``sql`` (the elements of pg_migrate_table's
``tables``), ``files``: the paths written, in the same order; ``changed`` is false (the
rendered files are the run's report, not a change to any system), as the old template task said with changed_when.
File names: ``NN_<table>.sql``, NN the table's position (01, 02, ...), unsafe characters as ``_``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.template import trust_as_template

UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def file_name(position: int, table: str) -> str:
    """``NN_<table>.sql`` (the name the role's template loop used)."""
    return f"{position:02d}_{UNSAFE.sub('_', table)}.sql"


def _files():
    """plugins/action/dedup_files.py (owner-only directories, atomic writes), loaded once by its path."""
    name = "dedup_action_files"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("dedup_files.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


make_private_dirs = _files().make_private_dirs
write_if_changed = _files().write_if_changed


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _requires_connection = False
    _VALID_ARGS = frozenset(("src", "dest_dir", "tables", "vars"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        args = self._task.args
        src, dest_dir = args.get("src"), args.get("dest_dir")
        tables = args.get("tables") or []
        extra = args.get("vars") or {}
        if not src or not dest_dir:
            raise AnsibleActionFail("dedup_render_sql needs src and dest_dir")
        if not isinstance(tables, list) or not all(isinstance(t, dict) and t.get("table") for t in tables):
            raise AnsibleActionFail("dedup_render_sql: tables must be a list of plan entries (dicts with 'table')")
        if not isinstance(extra, dict):
            raise AnsibleActionFail("dedup_render_sql: vars must be a dict")
        try:
            template = trust_as_template(self._loader.get_text_file_contents(src))
        except Exception as exc:  # noqa: BLE001 - the file's own error, named
            raise AnsibleActionFail(f"dedup_render_sql: cannot read the template {src}: {exc}") from exc
        make_private_dirs(dest_dir)
        base_vars = dict(task_vars or {})
        base_vars.update(extra)
        templar = self._templar.copy_with_new_env(searchpath=[os.path.dirname(src)], available_variables=base_vars)
        overrides = {"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"}
        out, files, written = [], [], 0
        for position, t in enumerate(tables, start=1):
            templar.available_variables = dict(base_vars, t=t)
            text = templar.template(template, escape_backslashes=False, overrides=overrides) or ""
            dest = os.path.join(dest_dir, file_name(position, t["table"]))
            written += write_if_changed(dest, text)
            out.append({"schema": t.get("schema"), "table": t["table"], "strategy": t.get("strategy", "replace"),
                        "sql": text})
            files.append(dest)
        result.update(changed=False, tables=out, files=files, written=written,
                      msg=f"{len(out)} table(s) rendered into {dest_dir} ({written} file(s) written)")
        return result
