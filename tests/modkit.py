"""Run the repo's custom modules in tests: imported as functions, or through the real `ansible` CLI.

Imported: ``run_module("pg_duplicates", {...})`` loads library/<name>.py, runs its ``main()`` with the
given arguments (ansible's own ``patch_module_args`` testing entry point) and returns the JSON result
the module printed (``failed`` set when it called fail_json). The repo's module_utils is made visible
as ``ansible.module_utils.*`` exactly as ansible.cfg does for real runs.

CLI: ``run_adhoc("pg_duplicates", {...})`` runs ``ansible localhost -m NAME -a JSON`` (passwords go
through a 0600 extra-vars file, never argv) with the repo's ansible.cfg and returns the parsed result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import ansible.module_utils
from ansible.module_utils import _internal as _ansible_internal
from ansible.module_utils.testing import patch_module_args

from harness import REPO, VENV_BIN, ansible_env

LIBRARY = REPO / "library"
MODULE_UTILS = REPO / "module_utils"

if str(MODULE_UTILS) not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(MODULE_UTILS))


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"dedup_library_{name}", LIBRARY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_module(name: str, args: dict, check: bool = False, diff: bool = False) -> dict:
    """Run library/<name>.py's main() in-process with ``args``; return its result dict."""
    mod = load_module(name)
    args = dict(args)
    if check:
        args["_ansible_check_mode"] = True
    if diff:
        args["_ansible_diff"] = True
    buf = io.StringIO()
    # In-process the module must behave as on a target: once anything of the controller has been imported in
    # this process (another test file did), ansible-core 2.19 routes module.warn() to the controller's Display
    # instead of the result's "warnings".
    was_controller = getattr(_ansible_internal, "is_controller", False)
    _ansible_internal.is_controller = False
    with patch_module_args(args), contextlib.redirect_stdout(buf):
        try:
            mod.main()
        except SystemExit:
            pass
        finally:
            _ansible_internal.is_controller = was_controller
    out = buf.getvalue().strip()
    try:
        return json.loads(out.splitlines()[-1] if out else "{}")
    except json.JSONDecodeError:
        start = out.find("{")
        return json.loads(out[start:])


def pg_args(pg, dbname: str, **extra) -> dict:
    """Connection arguments for the harness cluster (TCP, superuser, password)."""
    args = {
        "login_host": "127.0.0.1",
        "login_port": pg.port,
        "login_db": dbname,
        "login_user": pg.superuser,
        "login_password": pg.password,
    }
    args.update(extra)
    return args


def run_adhoc(name: str, args: dict, check: bool = False, diff: bool = False,
              env: dict | None = None, timeout: int = 300) -> tuple[dict, subprocess.CompletedProcess]:
    """``ansible localhost -m NAME -a JSON`` for real; returns (result dict, completed process)."""
    secrets = {k: v for k, v in args.items() if "password" in k}
    public = {k: v for k, v in args.items() if k not in secrets}
    for k in secrets:  # secrets travel in a 0600 extra-vars file, never in argv
        public[k] = f"{{{{ modkit_secrets['{k}'] }}}}"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"modkit_secrets": secrets}, fh)
    os.chmod(fh.name, 0o600)
    cmd = [str(VENV_BIN / "ansible"), "localhost", "-m", name, "-a", json.dumps(public), "-e", f"@{fh.name}", "-o"]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ansible_env(env), capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(fh.name)
    return parse_oneline(proc.stdout), proc


def parse_oneline(stdout: str) -> dict:
    """Parse ``ansible -o`` output: ``localhost | SUCCESS => {...}`` (one line)."""
    for line in stdout.splitlines():
        if "=>" in line and line.startswith("localhost"):
            payload = line.split("=>", 1)[1].strip()
            try:
                return json.loads(payload)
            except json.JSONDecodeError:
                continue
    return {}


def ansible_doc(name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ansible-doc"), "-M", str(LIBRARY), name],
        cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=120,
    )


def read_path(p: str | Path) -> bytes:
    return Path(p).read_bytes()


def render_sql(name: str, strict: bool = False, **ctx) -> str:
    """A template of sql/ rendered as the roles render it: the repo's own filters, trim_blocks (the default of
    ansible.builtin.template), the trailing newline kept. ``strict``: an undefined variable is an error."""
    import jinja2

    spec = importlib.util.spec_from_file_location("dedup_filters", REPO / "plugins" / "filter" / "dedup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO / "sql")), trim_blocks=True,
                             keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined if strict else jinja2.Undefined)
    env.filters.update(mod.FilterModule().filters())
    return env.get_template(name).render(**ctx)
