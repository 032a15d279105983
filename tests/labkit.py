"""labkit: the lab, for everyone's tests (registered in conftest.py with ``pytest_plugins = ["labkit"]``).

Fixtures
--------
``lab_template`` (session)
    The lab built ONCE per session by the real ``playbooks/lab_up.yml`` on the harness cluster
    (``lab_manage_cluster: false``) into the database ``lab_template``: role ``breezeway`` with a
    generated password, schema ``breezeway``, runbook-shaped duplicates at scale 0.001, the v1 ETL
    installed for a throwaway ETL OS user and run twice. Not to be modified by tests.

``lab`` (function)
    A :class:`Lab`: a clone of the template (``CREATE DATABASE ... TEMPLATE``, about a second), its
    own ``etl_dir`` with release v1 installed (``releases/v1``, ``current``, ``shared/db.json``,
    ``logs/``), the ETL user's ``~/.pgpass`` and crontab pointing at them, and a generated
    inventory (groups ``db`` and ``etl`` on localhost) for ``ansible-playbook -i lab.inventory``.
    Everything is dropped/removed after the test.

Needs root (the ETL OS user and its crontab are real); skips otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest
import yaml
from psycopg2 import sql

from harness import REPO, VENV_BIN, PgCluster, PlaybookResult, ansible_env, require_root, run_playbook, wait_for

LAB_SCALE = 0.001
TEMPLATE_DB = "lab_template"
SCHEMA = "breezeway"
DB_USER = "breezeway"
ETL_RELEASES = REPO / "etl" / "releases"
LAB_VARS = REPO / "roles" / "lab" / "vars" / "main.yml"

# Child tables and their natural keys (the runbook's; same as dedup_common's dedup_tables).
NATURAL_KEYS = {
    "task_requirements": ["task_pk", "requirement_id"],
    "property_photos": ["property_pk", "photo_id"],
    "reservation_guests": ["reservation_pk", "guest_id"],
    "task_assignments": ["task_pk", "assignee_id"],
    "task_photos": ["task_pk", "photo_id"],
    "task_comments": ["task_pk", "comment_id"],
    "task_tags": ["task_pk", "tag_pk"],
}
CHILD_TABLES = list(NATURAL_KEYS)
PARENT_TABLES = ["properties", "tasks", "reservations"]

_ETL_LINE = re.compile(r"^table=(\S+) sent=(\d+) affected=(\d+)$", re.M)


def lab_child_spec() -> list[dict]:
    """The lab's table spec (roles/lab/vars/main.yml): rows/unique at scale 1, fanout, payload."""
    with open(LAB_VARS) as fh:
        return yaml.safe_load(fh)["lab_child_tables"]


def fill_shape(scale: float = LAB_SCALE) -> dict[str, tuple[int, int]]:
    """{table: (rows, unique)} that the SQL fill makes at ``scale`` (before any ETL run)."""
    out = {}
    for t in lab_child_spec():
        u = max(1, round(t["unique"] * scale))
        out[t["name"]] = (max(u, round(t["rows"] * scale)), u)
    return out


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, pw.pw_uid, pw.pw_gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)


def etl_python_for(user: str) -> str:
    """The interpreter the lab role picks for the ETL user: the venv's if readable, else the system's."""
    for cand in (sys.executable, "/usr/bin/python3"):
        if _run(["runuser", "-u", user, "--", cand, "-c", "import psycopg2"]).returncode == 0:
            return cand
    raise RuntimeError(f"{user} has no python with psycopg2 (install python3-psycopg2)")


def write_inventory(
    path: Path, *, pg: PgCluster, dbname: str, password: str, etl_user: str, etl_dir: Path, root: Path
) -> Path:
    """An inventory like inventory/lab, pointing at ``dbname`` on the harness cluster."""
    (path / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    hosts = {
        "all": {
            "children": {"db": {"hosts": {"lab-db": None}}, "etl": {"hosts": {"lab-etl": None}}},
            "vars": {
                "ansible_connection": "local",
                "ansible_host": "localhost",
                "ansible_python_interpreter": sys.executable,
            },
        }
    }
    main = {
        "lab_root": str(root),
        "lab_scale": LAB_SCALE,
        "lab_manage_cluster": False,
        "lab_admin_host": "127.0.0.1",
        "lab_admin_port": pg.port,
        "lab_admin_user": pg.superuser,
        "dedup_db_host": "127.0.0.1",
        "dedup_db_port": pg.port,
        "dedup_db_name": dbname,
        "dedup_db_user": DB_USER,
        "dedup_backup_dir": str(root / "backups"),
        "dedup_report_root": str(root / "reports"),
        "dedup_etl_user": etl_user,
        "dedup_etl_dir": str(etl_dir),
        # The scheduled check writes system paths (/etc/cron.d ...): off in tests unless a test turns it on.
        "monitor_schedule": False,
    }
    (path / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    (path / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))
    secret = path / "group_vars" / "all" / "secret.yml"
    secret.touch(mode=0o600)
    os.chmod(secret, 0o600)
    secret.write_text(yaml.safe_dump({"dedup_db_password": password, "lab_admin_password": pg.password}))
    return path


@dataclass
class EtlRun:
    rc: int
    stdout: str
    stderr: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class LabTemplate:
    """The session's lab (database ``lab_template`` on the harness cluster)."""

    pg: PgCluster
    root: Path
    dbname: str
    password: str
    etl_user: str
    etl_home: Path
    etl_dir: Path
    etl_python: str
    crontab_text: str
    result: PlaybookResult


@dataclass
class Lab:
    """One test's lab: a clone database, its own etl_dir/crontab, an inventory."""

    pg: PgCluster
    root: Path
    dbname: str
    password: str
    etl_user: str
    etl_home: Path
    etl_dir: Path
    etl_python: str
    inventory: Path
    backup_dir: Path
    db_user: str = DB_USER
    schema: str = SCHEMA
    tables: list[str] = field(default_factory=lambda: list(CHILD_TABLES))
    natural_keys: dict[str, list[str]] = field(default_factory=lambda: dict(NATURAL_KEYS))

    # --- database ---
    def conn(self, autocommit: bool = True):
        """A connection as the ETL role ``breezeway`` (owner of the schema)."""
        c = psycopg2.connect(**self.pg.dsn(self.dbname, user=self.db_user, password=self.password))
        c.autocommit = autocommit
        return c

    def admin_conn(self, autocommit: bool = True):
        """A superuser connection to the test's database."""
        return self.pg.connect(self.dbname, autocommit=autocommit)

    def query(self, q, params=None) -> list[tuple]:
        c = self.conn()
        try:
            with c.cursor() as cur:
                cur.execute(q, params)
                return cur.fetchall() if cur.description else []
        finally:
            c.close()

    def counts(self) -> dict[str, int]:
        """Rows per child table."""
        parts = [
            sql.SQL("SELECT {name}, count(*) FROM {tbl}").format(
                name=sql.Literal(t), tbl=sql.Identifier(self.schema, t))
            for t in self.tables
        ]
        return dict(self.query(sql.SQL(" UNION ALL ").join(parts)))

    def unique_counts(self) -> dict[str, int]:
        """Distinct natural keys per child table."""
        parts = [
            sql.SQL("SELECT {name}, count(DISTINCT ({key})) FROM {tbl}").format(
                name=sql.Literal(t), tbl=sql.Identifier(self.schema, t),
                key=sql.SQL(", ").join(map(sql.Identifier, self.natural_keys[t])))
            for t in self.tables
        ]
        return dict(self.query(sql.SQL(" UNION ALL ").join(parts)))

    def duplicates(self) -> dict[str, int]:
        """Surplus rows per child table (rows - distinct natural keys)."""
        rows, uniq = self.counts(), self.unique_counts()
        return {t: rows[t] - uniq[t] for t in self.tables}

    # --- ETL host ---
    def crontab(self) -> str:
        """The ETL user's crontab ('' when it has none)."""
        p = _run(["crontab", "-u", self.etl_user, "-l"])
        return p.stdout if p.returncode == 0 else ""

    def set_crontab(self, text: str) -> None:
        _run(["crontab", "-u", self.etl_user, "-"], input=text, check=True)

    def install_release(self, version: str, natural_keys: dict | None = None, activate: bool = True) -> Path:
        """Copy etl/releases/<version> into releases/<version> (optionally natural_keys.json, switch current)."""
        dest = self.etl_dir / "releases" / version
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((ETL_RELEASES / version).glob("*.py")):
            shutil.copy2(src, dest / src.name)
        if natural_keys is not None:
            (dest / "natural_keys.json").write_text(json.dumps(natural_keys, indent=2) + "\n")
        if activate:
            tmp = self.etl_dir / ".current.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(f"releases/{version}")
            os.replace(tmp, self.etl_dir / "current")
        _chown_tree(self.etl_dir, self.etl_user)
        return dest

    def current_release(self) -> str:
        return os.readlink(self.etl_dir / "current")

    def run_etl(self, region: str, entity: str, env: dict | None = None, check: bool = True) -> EtlRun:
        """Run ``current/run_etl.py REGION ENTITY`` as the ETL user, like its cron line does."""
        full_env = dict(os.environ)
        full_env.pop("PGPASSWORD", None)
        full_env.update(env or {})
        p = _run(["runuser", "-u", self.etl_user, "--", self.etl_python, "run_etl.py", region, entity],
                 cwd=self.etl_dir / "current", env=full_env, timeout=300)
        run = EtlRun(p.returncode, p.stdout, p.stderr, {
            m.group(1): {"sent": int(m.group(2)), "affected": int(m.group(3))}
            for m in _ETL_LINE.finditer(p.stdout)
        })
        if check and p.returncode != 0:
            raise AssertionError(f"run_etl.py {region} {entity} failed (rc={p.returncode}):\n{p.stdout}\n{p.stderr}")
        return run

    # --- ansible ---
    def playbook(self, playbook, *args, **kw) -> PlaybookResult:
        """run_playbook() against this lab's inventory."""
        return run_playbook(playbook, *args, inventory=self.inventory, **kw)

    def start_playbook(self, playbook, **extra_vars) -> subprocess.Popen:
        """``ansible-playbook PLAYBOOK -i <lab> -e k=v ...`` in its own process group, output piped (text)."""
        cmd = [str(VENV_BIN / "ansible-playbook"), str(playbook), "-i", str(self.inventory)]
        for k, v in extra_vars.items():
            cmd += ["-e", f"{k}={v}"]
        return subprocess.Popen(cmd, cwd=REPO, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def kill_run(self, proc: subprocess.Popen) -> None:
        """SIGKILL a run started by start_playbook, and every process of it (ansible's forked workers can
        outlive the group kill, so everything naming this lab's inventory goes too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(self.inventory)], check=False)

    def run_killed_at(self, playbook, marker: str, delay: float = 0.0, timeout: float = 600,
                      **extra_vars) -> tuple[bool, str]:
        """Run PLAYBOOK and SIGKILL it ``delay`` seconds after a line containing ``marker`` appears.

        Returns (killed, output). killed is False when the run ended before the marker showed up."""
        proc = self.start_playbook(playbook, **extra_vars)
        lines: list[str] = []
        seen = threading.Event()

        def reader():
            for line in proc.stdout:
                lines.append(line)
                if marker in line:
                    seen.set()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        end = time.time() + timeout
        while not seen.is_set() and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        killed = False
        if seen.is_set():
            time.sleep(delay)
            killed = proc.poll() is None
            self.kill_run(proc)
        elif proc.poll() is None:
            self.kill_run(proc)
            th.join(timeout=10)
            raise AssertionError(f"{marker!r} did not appear within {timeout} s:\n" + "".join(lines)[-5000:])
        proc.wait(timeout=60)
        th.join(timeout=10)
        return killed, "".join(lines)

    def settle(self, timeout: float = 180, quiet_seconds: float = 5) -> None:
        """Wait until nothing a killed run left behind still works: no busy dedup-rollout session for
        ``quiet_seconds`` in a row (a module sleeping between lock retries is idle in between: keep the default
        when retries can happen) and no ETL process of this lab."""
        streak = {"n": 0}

        def quiet() -> bool:
            busy = self.query(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'dedup-rollout/%%' AND application_name NOT LIKE 'dedup-rollout/lock%%' "
                "AND state IS DISTINCT FROM 'idle' AND pid <> pg_backend_pid()")[0][0]
            etl = subprocess.run(["pgrep", "-u", self.etl_user, "-f", "run_etl.py"],
                                 capture_output=True).returncode == 0
            streak["n"] = streak["n"] + 1 if not busy and not etl else 0
            return streak["n"] >= quiet_seconds / 0.5

        wait_for(quiet, timeout=timeout, interval=0.5)


# --------------------------------------------------------------------------- fixtures


def _require_root() -> None:
    require_root("labkit creates a throwaway ETL OS user and installs its crontab")


@pytest.fixture(scope="session")
def lab_template(pg: PgCluster):
    """Build the lab once, with the real lab_up playbook, as the template database."""
    _require_root()
    root = Path(tempfile.mkdtemp(prefix="dedup-labkit-"))
    os.chmod(root, 0o755)
    etl_user = "dlab" + uuid.uuid4().hex[:8]
    etl_dir = root / "etl"
    (root / "home").mkdir(mode=0o755)
    inv = write_inventory(root / "labtest", pg=pg, dbname=TEMPLATE_DB, password="", etl_user=etl_user,
                          etl_dir=etl_dir, root=root)
    (inv / "group_vars" / "all" / "secret.yml").write_text(yaml.safe_dump({"lab_admin_password": pg.password}))
    tpl = None
    try:
        res = run_playbook(REPO / "playbooks" / "lab_up.yml", inventory=inv,
                           extra_vars={"lab_etl_user_home": str(root / "home" / etl_user)})
        if res.rc != 0 or res.failed():
            raise RuntimeError(f"labkit: lab_up failed (rc={res.rc}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}")
        password = (root / "secrets" / "db_password").read_text().strip()
        cron = _run(["crontab", "-u", etl_user, "-l"], check=True).stdout
        tpl = LabTemplate(pg=pg, root=root, dbname=TEMPLATE_DB, password=password, etl_user=etl_user,
                          etl_home=Path(pwd.getpwnam(etl_user).pw_dir), etl_dir=etl_dir,
                          etl_python=etl_python_for(etl_user), crontab_text=cron, result=res)
        yield tpl
    finally:
        _run(["crontab", "-u", etl_user, "-r"])
        _run(["userdel", "-r", etl_user])
        pg.drop_database(TEMPLATE_DB)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab(lab_template: LabTemplate):
    """A fresh lab for one test: a clone of the template database, its own etl_dir and crontab."""
    t = lab_template
    dbname = "lab_" + uuid.uuid4().hex[:12]
    root = Path(tempfile.mkdtemp(prefix="dedup-lab-"))
    os.chmod(root, 0o755)
    etl_dir = root / "etl"
    t.pg.create_database(dbname, template=t.dbname, owner=DB_USER)
    try:
        for sub in ("releases", "shared", "logs"):
            (etl_dir / sub).mkdir(parents=True)
        (etl_dir / "shared" / "db.json").write_text(json.dumps(
            {"host": "127.0.0.1", "port": t.pg.port, "dbname": dbname, "user": DB_USER}, indent=4) + "\n")
        inv = write_inventory(root / "labtest", pg=t.pg, dbname=dbname, password=t.password,
                              etl_user=t.etl_user, etl_dir=etl_dir, root=root)
        (root / "backups").mkdir()
        lab = Lab(pg=t.pg, root=root, dbname=dbname, password=t.password, etl_user=t.etl_user,
                  etl_home=t.etl_home, etl_dir=etl_dir, etl_python=t.etl_python, inventory=inv,
                  backup_dir=root / "backups")
        lab.install_release("v1")
        pgpass = t.etl_home / ".pgpass"
        pgpass.write_text(f"127.0.0.1:{t.pg.port}:*:{DB_USER}:{t.password}\n")
        os.chmod(pgpass, 0o600)
        os.chown(pgpass, pwd.getpwnam(t.etl_user).pw_uid, pwd.getpwnam(t.etl_user).pw_gid)
        lab.set_crontab(t.crontab_text.replace(str(t.etl_dir), str(etl_dir)))
        yield lab
    finally:
        _run(["crontab", "-u", t.etl_user, "-r"])
        t.pg.drop_database(dbname)
        shutil.rmtree(root, ignore_errors=True)
