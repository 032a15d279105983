"""Real-parts test harness: a throwaway PostgreSQL cluster and a real ansible-playbook runner.

Nothing here is mocked: the cluster is initdb + pg_ctl on a free loopback port in a temp dir
(run as an unprivileged OS user when the tests run as root), and playbooks are run with the
venv's real ``ansible-playbook``.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SUPERUSER_PASSWORD = "harness-super-Secret-9"


def pg_bindir() -> Path:
    """Newest PostgreSQL server bin dir installed by the OS packages (or PG_BINDIR)."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    cands = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
    )
    for cand in reversed(cands):
        if os.access(os.path.join(cand, "initdb"), os.X_OK):
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/bootstrap.sh")


def require_root(what: str) -> None:
    """Fail loudly (never skip) when a test needs root: a skipped category would hide what was not tested."""
    if os.geteuid() != 0:
        import pytest  # noqa: PLC0415 - harness is also imported outside pytest

        pytest.fail(f"{what}: these tests need root (throwaway OS users, crontabs, /etc/cron.d, mounts); run "
                    "the suite as root, as make test and .ci/run do", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_os_user() -> str | None:
    """The OS user that runs test servers: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root but no unprivileged 'postgres' user exists")


def as_user(cmd: list[str], user: str | None) -> list[str]:
    if user is None:
        return cmd
    return ["runuser", "-u", user, "--", *cmd]


@dataclass
class PgCluster:
    """A throwaway cluster. Superuser ``postgres``; TCP on 127.0.0.1 with scram passwords."""

    root: Path
    port: int
    os_user: str | None
    bindir: Path = field(default_factory=pg_bindir)
    superuser: str = "postgres"
    password: str = SUPERUSER_PASSWORD

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    @property
    def version(self) -> int:
        out = subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True).stdout
        return int(re.search(r"\)\s*(\d+)", out).group(1))

    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(as_user(cmd, self.os_user), check=True, capture_output=True, text=True, **kw)

    def init(self, extra_conf: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.os_user:
            uid = pwd.getpwnam(self.os_user).pw_uid
            gid = pwd.getpwnam(self.os_user).pw_gid
            for p in (self.root, self.sockdir, pwfile):
                os.chown(p, uid, gid)
        self._run([
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
            "--pwfile", str(pwfile), "-A", "scram-sha-256", "--auth-local=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        ])
        pwfile.unlink()
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "'256MB'",
            "max_wal_size": "'2GB'",
            "log_min_messages": "warning",
        }
        conf.update(extra_conf or {})
        with open(self.datadir / "postgresql.auto.conf", "a") as fh:
            for k, v in conf.items():
                fh.write(f"{k} = {v}\n")

    def start(self) -> None:
        self._run([
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "server.log"),
            "-w", "-t", "60", "start",
        ])

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            as_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"], self.os_user),
            capture_output=True, text=True,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> dict:
        return {
            "host": "127.0.0.1", "port": self.port, "dbname": dbname,
            "user": user or self.superuser,
            "password": self.password if password is None else password,
        }

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kw):
        conn = psycopg2.connect(**self.dsn(dbname, **kw))
        conn.autocommit = autocommit
        return conn

    def execute(self, sql_text: str, dbname: str = "postgres", params=None):
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql_text, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def scalar(self, sql_text: str, dbname: str = "postgres", params=None):
        rows = self.execute(sql_text, dbname, params)
        return rows[0][0] if rows else None

    def create_database(self, name: str, template: str | None = None, owner: str | None = None) -> None:
        from psycopg2 import sql

        q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            q += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if owner:
            q += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(q)
        finally:
            conn.close()

    def drop_database(self, name: str) -> None:
        from psycopg2 import sql

        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()


def start_cluster(extra_conf: dict[str, str] | None = None, bindir: Path | None = None) -> PgCluster:
    """initdb + start on a free port (server binaries from ``bindir``, default pg_bindir()); another process may
    grab the port meanwhile, so retry on a new one."""
    for attempt in range(3):
        root = Path(tempfile.mkdtemp(prefix="dedup-pg-"))
        cluster = PgCluster(root=root, port=free_port(), os_user=server_os_user(), bindir=bindir or pg_bindir())
        cluster.init(extra_conf)
        try:
            cluster.start()
            return cluster
        except subprocess.CalledProcessError:
            shutil.rmtree(root, ignore_errors=True)
            if attempt == 2:
                raise
    raise RuntimeError("unreachable")


def destroy_cluster(cluster: PgCluster) -> None:
    cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


# --------------------------------------------------------------------------- ansible

RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.M,
)


@dataclass
class PlaybookResult:
    rc: int
    stdout: str
    stderr: str
    recap: dict[str, dict[str, int]]

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def changed(self, host: str | None = None) -> int:
        if host:
            return self.recap[host]["changed"]
        return sum(h["changed"] for h in self.recap.values())

    def failed(self) -> int:
        return sum(h["failed"] + h["unreachable"] for h in self.recap.values())


def parse_recap(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in RECAP_RE.finditer(text):
        d = m.groupdict()
        host = d.pop("host")
        out[host] = {k: int(v) for k, v in d.items()}
    return out


def ansible_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PGPASSWORD", None)
    if extra:
        env.update(extra)
    return env


def run_playbook(
    playbook: str | Path,
    *args: str,
    inventory: str | Path | None = None,
    extra_vars: dict | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 900,
    check: bool = False,
) -> PlaybookResult:
    """Run the real ansible-playbook from the repo root; extra vars go through a JSON file."""
    cmd = [str(VENV_BIN / "ansible-playbook"), str(playbook)]
    if inventory:
        cmd += ["-i", str(inventory)]
    tmp = None
    if extra_vars:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(extra_vars, tmp)
        tmp.close()
        os.chmod(tmp.name, 0o600)
        cmd += ["-e", f"@{tmp.name}"]
    if check:
        cmd.append("--check")
    cmd += list(args)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ansible_env(env), capture_output=True, text=True, timeout=timeout)
    finally:
        if tmp:
            os.unlink(tmp.name)
    return PlaybookResult(proc.returncode, proc.stdout, proc.stderr, parse_recap(proc.stdout))


def wait_for(pred, timeout: float = 30.0, interval: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        val = pred()
        if val:
            return val
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
