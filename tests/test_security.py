"""Security (issue 10): secrets never leave the vault, backups are owner-only, no string-built SQL.

One real deploy on the lab is watched from outside: ``ps -eo args`` every 50 ms (argv of every
process, including pg_dump and the ETL smoke runs), the ansible log (ANSIBLE_LOG_PATH), the output,
the reports and the rendered SQL are scanned for the password; pg_dump gets it only in its environment
(PGPASSWORD, read from /proc while it runs), no pgpass file is written; the modes of the dump and the
reports are checked; a role that reads the application schema is
shown to be unable to read the backup schema. The static check proves no SQL is string-formatted.
"""

from __future__ import annotations

import ast
import glob
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql
from test_deploy import DEPLOY, LEDGER, ledger_tables

from harness import REPO, VENV_BIN

# --------------------------------------------------------------------------- no string-formatted SQL

SQL_CALLS = {"execute", "executemany", "mogrify", "SQL", "copy_expert"}
SCANNED = ["library", "module_utils", "plugins", "scripts", "roles/*/library", "bench/*.py", "etl/releases/v2"]


def _string_built(node: ast.AST) -> bool:
    """An f-string, "..." % x, "...".format(...) or "..." + x: SQL text built from values."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        consts = [n for n in (node.left, node.right) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if isinstance(node.op, ast.Mod):
            return bool(consts) and consts[0] is node.left
        return not all(isinstance(n, ast.Constant) for n in (node.left, node.right)) and (
            bool(consts) or _string_built(node.left) or _string_built(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
    return False


def string_built_sql(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in SQL_CALLS and _string_built(node.args[0]):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_no_string_formatted_sql_anywhere():
    """ruff S608 over the repo, plus an AST scan of every execute()/sql.SQL() in the project's Python."""
    ruff = subprocess.run([str(VENV_BIN / "ruff"), "check", "--select", "S608", "--output-format", "concise", "."],
                          cwd=REPO, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    files = sorted({Path(f) for pat in SCANNED for f in glob.glob(str(REPO / pat), recursive=False)
                    for f in ([f] if f.endswith(".py") else glob.glob(os.path.join(f, "**", "*.py"), recursive=True))})
    assert len(files) >= 15, files
    assert string_built_sql(files) == []
    # The scanner does catch what it looks for.
    bad = REPO / "tests" / "__s608_probe.py"
    bad.write_text('def f(cur, t, v):\n    cur.execute(f"SELECT * FROM {t}")\n    cur.execute("DELETE FROM %s" % t)\n'
                   '    cur.execute("SELECT {}".format(v))\n    cur.execute("SELECT " + v)\n'
                   '    cur.execute("SELECT %s", (v,))\n')
    try:
        assert len(string_built_sql([bad])) == 4
    finally:
        bad.unlink()


# --------------------------------------------------------------------------- a watched deploy


class Watcher(threading.Thread):
    """Samples argv of every process (``ps -eo args``) every 50 ms, the environment of every pg_dump, and any
    pgpass file under /tmp."""

    def __init__(self, secret: str, dbname: str = ""):
        super().__init__(daemon=True)
        self.secret = secret
        self.dbname = dbname
        self.stop = threading.Event()
        self.samples = 0
        self.leaks: list[str] = []
        self.commands: set[str] = set()
        self.pgpass_files: set[str] = set()
        self.pg_dump_env: dict[int, tuple[list[str], bool]] = {}

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            self.samples += 1
            for line in out.splitlines():
                if self.secret in line:
                    self.leaks.append(line)
                for word in ("pg_dump", "pg_restore", "run_etl.py"):
                    if word in line:
                        self.commands.add(word)
            self.pgpass_files.update(glob.glob("/tmp/dedup-pgpass-*"))
            for pid in subprocess.run(["pgrep", "-x", "pg_dump"], capture_output=True, text=True).stdout.split():
                try:  # this run's pg_dump only (other labs may dump at the same time)
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    raw = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                env = dict(kv.split("=", 1) for kv in raw.decode("utf-8", "replace").split("\0") if "=" in kv)
                if f"--dbname={self.dbname}".encode() in argv and env.get("PGAPPNAME") == "dedup-rollout/pg_dump":
                    # names of the PG* variables, and whether PGPASSWORD is the secret (never the value itself)
                    self.pg_dump_env[int(pid)] = (sorted(k for k in env if k.startswith("PG")),
                                                  env.get("PGPASSWORD") == self.secret)
            time.sleep(0.05)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_watched_deploy_leaks_no_password_and_keeps_backups_private(lab, tmp_path):
    reader_pw = "reader-pw-" + os.urandom(4).hex()
    admin = lab.admin_conn()
    with admin.cursor() as cur:
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (lab.db_user,))
        assert cur.fetchone()[0] is False, "the lab's owner role must not be a superuser"
        # A role that reads the application schema, including tables the owner creates later.
        cur.execute(sql.SQL("CREATE ROLE dedup_app_reader LOGIN PASSWORD {}").format(sql.Literal(reader_pw)))
        cur.execute("GRANT USAGE ON SCHEMA breezeway TO dedup_app_reader")
        cur.execute("GRANT SELECT ON ALL TABLES IN SCHEMA breezeway TO dedup_app_reader")
        cur.execute("ALTER DEFAULT PRIVILEGES FOR ROLE breezeway GRANT SELECT ON TABLES TO dedup_app_reader")
    admin.close()
    log = tmp_path / "ansible.log"
    watcher = Watcher(lab.password, lab.dbname)
    watcher.start()
    try:
        res = lab.playbook(DEPLOY, "-v", env={"ANSIBLE_LOG_PATH": str(log)},
                           extra_vars={"dedup_forbid_superuser": True})
    finally:
        watcher.stop.set()
        watcher.join(timeout=10)
    try:
        assert res.rc == 0, res.output[-5000:]
        # argv: sampled all along, pg_dump and the ETL were seen, the password never.
        assert watcher.samples > 100, watcher.samples
        assert {"pg_dump", "run_etl.py"} <= watcher.commands, watcher.commands
        assert watcher.leaks == [], watcher.leaks[:3]
        # The ansible log, the output, the reports, the rendered SQL, the dump: no password.
        assert log.stat().st_size > 10000
        assert lab.password not in log.read_text()
        assert lab.password not in res.output
        report_files = [p for p in (lab.root / "reports").rglob("*") if p.is_file()]
        assert any(p.suffix == ".sql" for p in report_files)
        for p in report_files + [p for p in lab.backup_dir.rglob("*") if p.is_file()]:
            assert lab.password.encode() not in p.read_bytes(), f"password in {p}"
            assert mode(p) == 0o600, f"{p} is {oct(mode(p))}"
        for d in [p for p in (lab.root / "reports").rglob("*") if p.is_dir()][1:] + [lab.backup_dir]:
            assert mode(d) & 0o077 == 0, f"{d} is {oct(mode(d))}"
        # pg_dump: the password only in its environment (PGPASSWORD), no password file written anywhere.
        assert watcher.pg_dump_env, "pg_dump's environment was never observed"
        for pid, (names, is_secret) in watcher.pg_dump_env.items():
            assert is_secret and "PGPASSFILE" not in names, (pid, names)
        assert watcher.pgpass_files == set(), watcher.pgpass_files
        assert not [p for p in lab.root.rglob("*pgpass*")], "a password file was written"
        # The ledger's record of the run carries no password either.
        runs = lab.query(sql.SQL("SELECT r::text FROM {} r").format(sql.Identifier(LEDGER, "runs")))
        assert runs and all(lab.password not in r[0] for r in runs)

        # The backup schema: not readable by a role that reads the application schema.
        backups = [r["backup_table"] for r in ledger_tables(lab) if r["backup_table"]]
        assert backups
        reader = psycopg2.connect(**lab.pg.dsn(lab.dbname, user="dedup_app_reader", password=reader_pw))
        reader.autocommit = True
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM breezeway.task_photos")  # the application schema: readable
            cur.execute("SELECT has_schema_privilege(%s, 'USAGE')", (LEDGER,))
            assert cur.fetchone()[0] is False
            for table in [*backups, "runs", "table_runs"]:
                try:
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(LEDGER, table)))
                except psycopg2.errors.InsufficientPrivilege as exc:
                    assert "permission denied" in str(exc)
                else:
                    raise AssertionError(f"dedup_app_reader can read {LEDGER}.{table}")
        reader.close()
        # Defence in depth: the backup tables grant nothing to anyone but their owner, even though default
        # privileges hand new tables of the owner to the reader.
        acl = lab.query("SELECT c.relname, c.relacl::text FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relname = ANY (%s)", (LEDGER, backups))
        assert len(acl) == len(backups)
        for rel, relacl in acl:
            assert relacl is None or all(e.startswith(f"{lab.db_user}=") for e in relacl.strip("{}").split(",")), \
                (rel, relacl)
        nspacl = lab.query("SELECT nspacl::text FROM pg_namespace WHERE nspname = %s", (LEDGER,))[0][0]
        assert nspacl is None or "dedup_app_reader" not in nspacl and "=U" not in nspacl.replace(
            f"{lab.db_user}=U", ""), nspacl
    finally:
        admin = lab.admin_conn()
        with admin.cursor() as cur:
            cur.execute("DROP OWNED BY dedup_app_reader")
            cur.execute("DROP ROLE dedup_app_reader")
        admin.close()
