"""The modules' documentation against their code (pure, no cluster). validate-modules (scripts/sanity.sh)
checks options against argument specs but not results: here every keyword a module passes to exit_json is
documented in its RETURN, and the action plugin of pg_migrate_table passes on exactly the connection options."""

from __future__ import annotations

import ast

import pytest
import yaml
from _load import REPO, by_path, module_util

MODULES = sorted([*REPO.glob("library/*.py"), *REPO.glob("roles/*/library/*.py")])
NOT_DOCUMENTED = {"changed", "msg", "diff", "warnings"}  # Ansible's own result keys


def _docs(tree):
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
                out[node.targets[0].id] = yaml.safe_load(node.value.value)
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_exit_json_keywords_are_in_return(path):
    tree = ast.parse(path.read_text())
    docs = _docs(tree)
    assert set(docs) == {"DOCUMENTATION", "EXAMPLES", "RETURN"}
    returned = set(docs["RETURN"] or {})
    used = {kw.arg for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit_json"
            for kw in node.keywords if kw.arg}
    assert used - NOT_DOCUMENTED <= returned, f"{path.name}: RETURN lacks {sorted(used - NOT_DOCUMENTED - returned)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_documentation_comes_before_the_imports(path):
    tree = ast.parse(path.read_text())
    first_doc = min(n.lineno for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") in ("DOCUMENTATION", "EXAMPLES", "RETURN"))
    imports = [n for n in tree.body if isinstance(n, ast.Import)
               or (isinstance(n, ast.ImportFrom) and n.module != "__future__")]
    assert all(n.lineno > first_doc for n in imports), path.name


def test_action_plugin_passes_on_the_connection_options():
    action = by_path("plugins/action/pg_migrate_table.py", "dedup_action_pg_migrate_table")
    spec = module_util("dedup_pg").pg_common_argument_spec()
    expected = set(spec) | {alias for option in spec.values() for alias in option.get("aliases", [])}
    assert action.connection_options() == expected
    # none of pg_migrate_table's own options would reach pg_migrate_progress
    own = set(_docs(ast.parse((REPO / "library" / "pg_migrate_table.py").read_text()))["DOCUMENTATION"]["options"])
    assert own and not own & action.connection_options()
