"""Load the project's Python files for the unit tests: plugins by path, module_utils as Ansible does.

module_utils files import each other as ``ansible.module_utils.dedup_*`` (the name they have in a module's
payload), so the repo's module_utils directory is added to that package's path, as tests/modkit.py does.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import ansible.module_utils

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "module_utils"))


def by_path(relpath: str, name: str):
    """Import the file REPO/relpath under ``name`` (plugins are not packages)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_util(name: str):
    """module_utils/<name>.py as ansible.module_utils.<name>."""
    return importlib.import_module("ansible.module_utils." + name)
