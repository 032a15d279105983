"""Security (issue 10): secrets never leave the vault, backups are owner-only, no string-built SQL.

One real deploy on the lab is watched from outside: ``ps -eo args`` every 50 ms (argv of every
process, including pg_dump and the ETL smoke runs), the ansible log (ANSIBLE_LOG_PATH), the output,
the reports and the rendered SQL are scanned for the password; the modes of the dump, the reports
and the pgpass file are checked while they exist; a role that reads the application schema is
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
    """Samples argv of every process (``ps -eo args``) every 50 ms and the pgpass files of the dump step."""

    def __init__(self, secret: str):
        super().__init__(daemon=True)
        self.secret = secret
        self.stop = threading.Event()
        self.samples = 0
        self.leaks: list[str] = []
        self.commands: set[str] = set()
        self.pgpass_modes: dict[str, tuple[int, int, int]] = {}

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
            for f in glob.glob("/tmp/dedup-pgpass-*/pgpass"):
                try:
                    d, s = os.stat(os.path.dirname(f)), os.stat(f)
                    self.pgpass_modes[f] = (stat.S_IMODE(d.st_mode), stat.S_IMODE(s.st_mode), s.st_uid)
                except OSError:
                    pass
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
    stale = set(glob.glob("/tmp/dedup-pgpass-*"))
    watcher = Watcher(lab.password)
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
        # The pgpass file of pg_dump: seen while it existed, 0600 in a 0700 directory; gone afterwards.
        assert watcher.pgpass_modes, "the pgpass file was never observed"
        for f, (dmode, fmode, _uid) in watcher.pgpass_modes.items():
            assert (dmode, fmode) == (0o700, 0o600), (f, oct(dmode), oct(fmode))
        assert set(glob.glob("/tmp/dedup-pgpass-*")) <= stale, "a pgpass directory was left behind"
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
