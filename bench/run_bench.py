#!/usr/bin/env python3
"""Benchmark: the runbook's own migration (contender A) against this project's (contender B).

One throwaway PostgreSQL cluster with default durability settings (fsync, synchronous_commit and
full_page_writes on; only port, socket and listen address differ). Per scale, the runbook-shaped
database is built once in bulk SQL (bench/sql/build.sql), then cloned with CREATE DATABASE ...
TEMPLATE for every contender. For each contender: wall time, WAL written, peak extra disk, database
size after, the longest stall of a concurrent single-row writer to task_requirements, peak RSS of
the ansible processes (B), and an end-state check. Prints a table and writes JSON under
bench/results/.

Nothing here pulls table rows into Python: every check is an aggregate computed by the server.

The `regions` row times the real deploy_dedup.yml on one region (one db host, its own clone) and then on
N regions at once (N db hosts, N clones, N region groups, one inventory): t_N / t_1 is 1.0 for a perfect
fan-out and N for one region after another.

Usage: .venv/bin/python bench/run_bench.py [--scale 0.1 | --sweep 0.025,0.05,0.1 | --quick]
                                           [--contenders A2,B-table,B-dump,regions,dupcheck,A1] [--keep]
                                           [--regions 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

import psycopg2  # noqa: E402
import yaml  # noqa: E402
from psycopg2 import sql  # noqa: E402

from harness import PgCluster, ansible_env, free_port, parse_recap, server_os_user  # noqa: E402

SCHEMA = "breezeway"
# The project's table list (roles/dedup_common/defaults/main.yml): name and natural key.
TABLES = [
    {"name": "task_requirements", "natural_key": ["task_pk", "requirement_id"]},
    {"name": "property_photos", "natural_key": ["property_pk", "photo_id"]},
    {"name": "reservation_guests", "natural_key": ["reservation_pk", "guest_id"]},
    {"name": "task_assignments", "natural_key": ["task_pk", "assignee_id"]},
    {"name": "task_photos", "natural_key": ["task_pk", "photo_id"]},
    {"name": "task_comments", "natural_key": ["task_pk", "comment_id"]},
    {"name": "task_tags", "natural_key": ["task_pk", "tag_pk"]},
]
DUPLICATED = [t for t in TABLES if t["name"] != "task_tags"]  # the six tables contender A touches

# Default durability: undo what tests/harness.py relaxes for speed (fsync=off and friends).
DEFAULT_CONF = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "'128MB'",
    "max_wal_size": "'1GB'",
}
A2_SETTINGS = {"work_mem": "512MB", "maintenance_work_mem": "1GB"}
WRITER_KEY_BASE = 2_000_000_000  # requirement_id of the concurrent writer's rows (never collide)
ALL_CONTENDERS = ["A1", "A2", "A2-dump", "B-sql-table", "B-sql-dump", "B-table", "B-dump", "B-deploy", "B-online",
                  "B-online-repack", "regions", "dupcheck"]
# A1 last: at 1/10 it runs into --timeout.
DEFAULT_CONTENDERS = "A2,B-sql-table,B-sql-dump,B-table,B-dump,regions,dupcheck,A1"
# Contenders timed without the concurrent writer: the whole deploy runs offline with its ETL paused, and its
# validation refuses natural keys that appear during the migration (what the writer inserts), as it should; the
# runbook's sequence it is compared with (A2-dump) pauses the ETL too.
NO_WRITER = {"B-deploy", "A2-dump"}
# What each contender's seconds cover (a column of the table).
MEASURES = {
    "A1": "psql script", "A2": "psql script",
    "A2-dump": "pg_dump -Fc, then the A2 psql script (the runbook's sequence)",
    "B-deploy": "whole deploy_dedup.yml (dump backup, no ETL host) incl. ansible overhead",
    "B-sql-table": "migration SQL as the role runs it (no ansible)",
    "B-sql-dump": "migration SQL as the role runs it (no ansible)",
    "B-table": "whole playbook incl. ansible overhead", "B-dump": "whole playbook incl. ansible overhead",
    "B-online": "whole playbook incl. ansible overhead",
    "B-online-repack": "whole playbook incl. ansible overhead, pg_repack",
}
# roles/migrate/defaults/main.yml: what the role passes to pg_migrate_table and pg_unique_constraint.
MIGRATE_DEFAULTS = {"lock_timeout": "5s", "retries": 5, "retry_delay": 1.0}
MIGRATE_PLAYBOOK = REPO / "playbooks" / "migrate_only.yml"
DEPLOY_PLAYBOOK = REPO / "deploy_dedup.yml"  # the entry point an operator runs (imports playbooks/deploy_dedup.yml)


# --------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def disk_usage(paths: list[Path]) -> int:
    """Allocated bytes under paths (files may vanish while we walk: ignore them)."""
    total = 0
    stack = [str(p) for p in paths]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return total


def proc_tree_rss(root_pid: int) -> tuple[int, int]:
    """(sum, max) of VmRSS in bytes over root_pid and all its descendants, read from /proc."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    total = biggest = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        total += rss
                        biggest = max(biggest, rss)
                        break
        except OSError:
            continue
    return total, biggest


class Sampler(threading.Thread):
    """Every 0.2 s: disk used under the data dir (+ extra dirs), and RSS of a process tree."""

    def __init__(self, paths: list[Path], interval: float = 0.2):
        super().__init__(daemon=True)
        self.paths = paths
        self.interval = interval
        self.stop_event = threading.Event()
        self.start_bytes = disk_usage(paths)
        self.peak_bytes = self.start_bytes
        self.samples = 0
        self.rss_pid: int | None = None
        self.peak_rss_sum = 0
        self.peak_rss_max = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, disk_usage(self.paths))
            self.samples += 1
            if self.rss_pid:
                s, m = proc_tree_rss(self.rss_pid)
                self.peak_rss_sum = max(self.peak_rss_sum, s)
                self.peak_rss_max = max(self.peak_rss_max, m)
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        self.peak_bytes = max(self.peak_bytes, disk_usage(self.paths))


class Writer(threading.Thread):
    """A concurrent single-row writer: one INSERT into task_requirements every 50 ms, timed."""

    def __init__(self, cluster: PgCluster, db: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.db = db
        self.interval = interval
        self.stop_event = threading.Event()
        self.max_latency = 0.0
        self.committed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        conn = None
        n = 0
        stmt = sql.SQL(
            "INSERT INTO {}.task_requirements (task_pk, requirement_id, label, value, attrs) "
            "VALUES (1, %s, 'bench-writer', 0, '{{}}')"
        ).format(sql.Identifier(SCHEMA))
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg2.connect(**self.cluster.dsn(self.db), application_name="bench-writer")
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(stmt, (WRITER_KEY_BASE + n,))
                self.committed += 1
            except psycopg2.Error as exc:
                if len(self.errors) < 20:
                    self.errors.append(str(exc).strip().splitlines()[0])
                try:
                    if conn is not None:
                        conn.close()
                except psycopg2.Error:
                    pass
                conn = None
            n += 1
            self.max_latency = max(self.max_latency, time.monotonic() - t0)
            self.stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():  # never started for the contenders of NO_WRITER
            self.join(timeout=600)


# --------------------------------------------------------------------------- cluster

def start_bench_cluster(workroot: Path) -> PgCluster:
    workroot.mkdir(parents=True, exist_ok=True)
    os.chmod(workroot, 0o755)
    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=workroot))
    cluster = PgCluster(root=root, port=free_port(), os_user=server_os_user())
    cluster.init(DEFAULT_CONF)
    cluster.start()
    return cluster


def psql_cmd(cluster: PgCluster, db: str, *args: str) -> list[str]:
    return [str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(cluster.port), "-U", cluster.superuser, "-d", db, *args]


def psql_env(cluster: PgCluster) -> dict[str, str]:
    env = dict(os.environ)
    env["PGPASSWORD"] = cluster.password  # the environment, never argv
    env.pop("PGOPTIONS", None)
    return env


def terminate_sessions(cluster: PgCluster, db: str) -> None:
    cluster.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        params=(db,),
    )


def clone(cluster: PgCluster, src: str, dst: str) -> None:
    cluster.drop_database(dst)
    q = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dst), sql.Identifier(src))
    if cluster.version >= 15:
        q += sql.SQL(" STRATEGY FILE_COPY")  # a checkpoint and a file copy, not the whole DB through WAL
    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(q)
    finally:
        conn.close()


def build_source(cluster: PgCluster, db: str, scale: float, logdir: Path) -> dict:
    cluster.drop_database(db)
    cluster.create_database(db)
    t0 = time.monotonic()
    with open(logdir / f"build-{db}.log", "w") as fh:
        subprocess.run(psql_cmd(cluster, db, "-v", f"scale={scale}", "-f", str(BENCH / "sql" / "build.sql")),
                       env=psql_env(cluster), stdout=fh, stderr=subprocess.STDOUT, check=True)
    spec = cluster.execute("SELECT tbl, n, u FROM bench.bench_spec WHERE parent <> '' ORDER BY n DESC", db)
    return {
        "seconds": round(time.monotonic() - t0, 2),
        "db_size_mb": mb(cluster.scalar("SELECT pg_database_size(current_database())", db)),
        "tables": {tbl: {"rows": n, "unique_keys": u} for tbl, n, u in spec},
    }


def mb(n: int | float | None) -> float | None:
    return None if n is None else round(float(n) / 1048576, 1)


# --------------------------------------------------------------------------- the DELETE's plan

def explain_a(cluster: PgCluster, db: str) -> dict:
    """EXPLAIN each of contender A's DELETEs, on default settings and on A2's: hashed NOT IN or not."""
    out: dict[str, dict] = {}
    conn = cluster.connect(db)
    try:
        for label, settings in (("A1", {}), ("A2", A2_SETTINGS)):
            with conn.cursor() as cur:
                cur.execute("RESET ALL")
                for k, v in settings.items():
                    cur.execute("SELECT set_config(%s, %s, false)", (k, v))
                for t in DUPLICATED:
                    key = sql.SQL(", ").join(map(sql.Identifier, t["natural_key"]))
                    tbl = sql.Identifier(SCHEMA, t["name"])
                    cur.execute(sql.SQL(
                        "EXPLAIN DELETE FROM {t} WHERE id NOT IN (SELECT DISTINCT ON ({k}) id FROM {t} "
                        "ORDER BY {k}, id)").format(t=tbl, k=key))
                    plan = "\n".join(r[0] for r in cur.fetchall())
                    out.setdefault(t["name"], {})[label] = {
                        "hashed_subplan": "hashed SubPlan" in plan,
                        "plan": plan,
                    }
    finally:
        conn.close()
    return out


# --------------------------------------------------------------------------- end-state check

def verify(cluster: PgCluster, db: str, spec: dict, writer_committed: int) -> dict:
    """Aggregates only: rows, distinct keys, oldest kept, unique constraint, writer rows present."""
    res: dict = {"tables": {}, "ok": True}
    conn = cluster.connect(db)
    try:
        with conn.cursor() as cur:
            for t in TABLES:
                name, key = t["name"], t["natural_key"]
                tbl = sql.Identifier(SCHEMA, name)
                u = spec[name]["unique_keys"]
                writer_row = sql.SQL("requirement_id >= {}").format(sql.Literal(WRITER_KEY_BASE)) \
                    if name == "task_requirements" else sql.SQL("false")
                cur.execute(sql.SQL(
                    "SELECT count(*), count(DISTINCT ({k})), "
                    "count(*) FILTER (WHERE id > {u} AND NOT ({w})), count(*) FILTER (WHERE {w}) FROM {t}"
                ).format(k=sql.SQL(", ").join(map(sql.Identifier, key)), u=sql.Literal(u), w=writer_row, t=tbl))
                rows, distinct, not_oldest, writer_rows = cur.fetchone()
                cur.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique "
                    "AND i.indisvalid AND i.indpred IS NULL AND (SELECT array_agg(a.attname::text ORDER BY "
                    "a.attname) FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) "
                    "= %s::text[])",
                    (f"{SCHEMA}.{name}", sorted(key)),
                )
                unique = cur.fetchone()[0]
                ok = rows == distinct and not_oldest == 0 and unique
                res["tables"][name] = {"rows": rows, "duplicates": rows - distinct, "kept_not_oldest": not_oldest,
                                       "unique_constraint": unique}
                if name == "task_requirements":
                    res["writer_rows_committed"] = writer_committed
                    res["writer_rows_found"] = writer_rows
                    ok = ok and writer_rows == writer_committed
                res["ok"] = res["ok"] and ok
            # Where removed rows went: tables of the backup schema and the runbook's *_backup tables.
            cur.execute(
                "SELECT n.nspname || '.' || c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND (n.nspname = 'dedup_rollout' OR "
                "(n.nspname = %s AND c.relname LIKE '%%\\_backup')) ORDER BY 1",
                (SCHEMA,),
            )
            backups = {}
            for qualified, _kind in cur.fetchall():
                nsp, rel = qualified.split(".", 1)
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(nsp, rel)))
                backups[qualified] = cur.fetchone()[0]
            res["backup_tables_rows"] = backups
    finally:
        conn.close()
    return res


# --------------------------------------------------------------------------- contenders

def run_process(cmd: list[str], env: dict, logfile: Path, timeout: float, sampler: Sampler | None = None,
                cwd: Path | None = None) -> tuple[int | None, bool]:
    """Run cmd with output to logfile; returns (rc, timed_out). The sampler follows its RSS."""
    with open(logfile, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
        if sampler is not None:
            sampler.rss_pid = proc.pid
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            return None, True


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def contender_a(ctx: dict, name: str, db: str, workdir: Path, sampler: Sampler) -> dict:
    cluster: PgCluster = ctx["cluster"]
    args: list[str] = []
    dump_out: dict = {}
    if name == "A2-dump":
        # The runbook's own sequence: its backup (pg_dump -Fc of the database), then A2's migration.
        dumpfile = workdir / "runbook.dump"
        t0 = time.monotonic()
        rc, timed_out = run_process([str(cluster.bindir / "pg_dump"), "-Fc", "-h", "127.0.0.1", "-p", str(cluster.port),
                                     "-U", cluster.superuser, "-d", db, "-f", str(dumpfile)], psql_env(cluster),
                                    workdir / "pg_dump.log", ctx["timeout"])
        dump_out = {"pg_dump_seconds": round(time.monotonic() - t0, 2),
                    "pg_dump_mb": mb(dumpfile.stat().st_size) if dumpfile.exists() else None}
        dumpfile.unlink(missing_ok=True)
        if timed_out or rc != 0:
            return {"rc": rc, "timed_out": timed_out, "error": tail(workdir / "pg_dump.log"), **dump_out}
    if name in ("A2", "A2-dump"):
        for k, v in A2_SETTINGS.items():
            args += ["-c", f"SET {k} = '{v}'"]
    args += ["-f", str(BENCH / "sql" / "contender_a.sql")]
    logfile = workdir / "psql.log"
    rc, timed_out = run_process(psql_cmd(cluster, db, *args), psql_env(cluster), logfile, ctx["timeout"])
    out = {"rc": rc, "timed_out": timed_out, "settings": A2_SETTINGS if name != "A1" else "defaults", **dump_out}
    if timed_out or rc != 0:
        out["error"] = "timed out" if timed_out else tail(logfile)
    # psql \timing lines, one per statement, in file order.
    out["statement_ms"] = [float(m) for m in re.findall(r"^Time: ([\d.]+) ms", logfile.read_text(), re.M)]
    return out


def write_inventory(workdir: Path) -> Path:
    inv = workdir / "bench"
    inv.mkdir(parents=True, exist_ok=True)
    (inv / "hosts.yml").write_text(
        "all:\n  children:\n    db:\n      hosts:\n        bench-db:\n"
        "          ansible_connection: local\n"
        f"          ansible_python_interpreter: {sys.executable}\n"
        "    etl:\n      hosts: {}\n"
    )
    return inv


def write_vars(ctx: dict, db: str, workdir: Path, backup_mode: str, extra: dict | None = None) -> Path:
    """The contender's variables as a 0600 JSON file for -e @file (it holds the password: delete it after use)."""
    path = workdir / "vars.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(bench_vars(ctx, db, workdir, backup_mode, extra), fh)
    return path


def bench_vars(ctx: dict, db: str, workdir: Path, backup_mode: str, extra: dict | None = None) -> dict:
    cluster: PgCluster = ctx["cluster"]
    report_root = workdir / "reports"
    backup_dir = workdir / "backup"
    report_root.mkdir(exist_ok=True)
    backup_dir.mkdir(exist_ok=True)
    data = {
        "dedup_db_host": "127.0.0.1",
        "dedup_db_port": cluster.port,
        "dedup_db_name": db,
        "dedup_db_user": cluster.superuser,
        "dedup_db_password": cluster.password,
        "dedup_schema": SCHEMA,
        "dedup_tables": TABLES,
        "dedup_backup_mode": backup_mode,
        "dedup_report_root": str(report_root),
        "dedup_backup_dir": str(backup_dir),
        # An explicit run id (an operator variable, see dedup_common defaults): reports are easy to find.
        "dedup_run_id": f"bench-{workdir.parent.parent.name.removeprefix('run-')}-{workdir.name}",
    }
    data.update(extra or {})
    return data


def contender_b(ctx: dict, name: str, db: str, workdir: Path, sampler: Sampler) -> dict:
    mode = {"B-table": "table", "B-dump": "dump", "B-online": "table", "B-online-repack": "table",
            "B-deploy": "dump"}[name]
    extra = {"dedup_mode": "online"} if name.startswith("B-online") else {}
    playbook = MIGRATE_PLAYBOOK
    if name == "B-deploy":  # the whole deploy_dedup.yml of a database without an ETL host (README), dump backup
        playbook, extra = DEPLOY_PLAYBOOK, {"monitor_schedule": False}
    out: dict = {"backup_mode": mode, "playbook": str(playbook.relative_to(REPO)), **extra}
    if not playbook.exists():
        out.update(rc=None, timed_out=False, missing=True, error=f"{out['playbook']} does not exist (yet)")
        return out
    inv = write_inventory(workdir)
    varsfile = write_vars(ctx, db, workdir, mode, extra)
    logfile = workdir / "ansible.log"
    timer_file = workdir / "task_times.json"
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), str(playbook), "-i", str(inv),
           "-e", f"@{varsfile}"]
    try:
        rc, timed_out = run_process(cmd, ansible_env(timer_env(timer_file)), logfile, ctx["timeout"],
                                    sampler=sampler, cwd=REPO)
    finally:
        varsfile.unlink(missing_ok=True)  # it holds the password
    text = logfile.read_text(errors="replace")
    out.update(rc=rc, timed_out=timed_out, recap=parse_recap(text))
    out.update(task_times(timer_file))
    # The migrate role's per-table summary ("t: N -> M rows ... in S s"): the SQL work of each table.
    per_table = re.findall(r"msg: '(\w+): (\d+) -> (\d+) rows.*? in ([\d.]+) s \(", text, re.S)
    if per_table:
        out["migrate_table_seconds"] = {t: float(sec) for t, _n, _m, sec in per_table}
        out["migrate_tables_total_seconds"] = round(sum(float(x[3]) for x in per_table), 3)
    if timed_out or rc != 0:
        out["error"] = "timed out" if timed_out else tail(logfile, 40)
        msgs = re.findall(r"^\s*msg: (.*)$", text, re.M)
        out["error_summary"] = "timed out" if timed_out else (msgs[-1] if msgs else tail(logfile, 1))[:300]
    dumps = [p for p in (workdir / "backup").rglob("*") if p.is_file()]
    out["backup_dir_files"] = {str(p.relative_to(workdir)): mb(p.stat().st_size) for p in dumps}
    return out


def timer_env(path: Path) -> dict[str, str]:
    """Enable bench/callback_plugins/bench_timer.py (per-task wall time) for one ansible run."""
    configured = os.environ.get("ANSIBLE_CALLBACK_PLUGINS", "")
    return {"ANSIBLE_CALLBACK_PLUGINS": ":".join(filter(None, [str(BENCH / "callback_plugins"), configured])),
            "ANSIBLE_CALLBACKS_ENABLED": "bench_timer", "BENCH_TIMER_FILE": str(path)}


def task_times(path: Path, top: int = 12) -> dict:
    """The slowest tasks and the playbook's own total, from the bench_timer callback's file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    tasks = doc.get("tasks", [])
    return {"ansible_total_seconds": doc.get("total_seconds"), "task_count": len(tasks),
            "slowest_tasks": sorted(tasks, key=lambda t: -t["seconds"])[:top]}


# --------------------------------------------------------------------------- B-sql: the role's SQL without ansible

def prepare_bsql(ctx: dict, name: str, db: str, workdir: Path) -> dict:
    """Render the migration with the render-only playbook (untimed) and read the plan it was made from.

    `migrate_only.yml -e migrate_render_only=true` plans every table, creates the ledger
    (sql/ledger.sql.j2 through pg_ledger action=init), records the run and renders one file per table
    into the run's report directory; it stops before touching any table. Its own dedup_run_id
    (bench-<stamp>-B-sql-<mode>) differs from the playbook contenders'.
    """
    mode = {"B-sql-table": "table", "B-sql-dump": "dump"}[name]
    out: dict = {"backup_mode": mode}
    if not MIGRATE_PLAYBOOK.exists():
        out["error"] = f"{MIGRATE_PLAYBOOK.relative_to(REPO)} does not exist (yet)"
        return out
    inv = write_inventory(workdir)
    varsfile = write_vars(ctx, db, workdir, mode, {"migrate_render_only": True})
    run_id = json.loads(varsfile.read_text())["dedup_run_id"]
    logfile = workdir / "render.log"
    t0 = time.monotonic()
    try:
        rc, timed_out = run_process([str(Path(sys.executable).parent / "ansible-playbook"), str(MIGRATE_PLAYBOOK),
                                     "-i", str(inv), "-e", f"@{varsfile}"], ansible_env(), logfile,
                                    ctx["timeout"], cwd=REPO)
    finally:
        varsfile.unlink(missing_ok=True)  # it holds the password
    out.update(render_seconds=round(time.monotonic() - t0, 2), render_rc=rc, run_id=run_id)
    if timed_out or rc != 0:
        out["error"] = "render timed out" if timed_out else "render failed: " + tail(logfile, 40)
        return out
    files = sorted((workdir / "reports").rglob(f"{run_id}/*/sql/*.sql"))
    out["files"] = [str(f) for f in files]
    # The plan the role rendered from (read-only; resumes the run the render recorded, same deploy id).
    plan = modkit().run_module("pg_dedup_plan", module_conn(ctx, db, schema=SCHEMA, tables=TABLES,
                                                            backup_schema="dedup_rollout", run_id=run_id,
                                                            strategy="replace"))
    if plan.get("failed"):
        out["error"] = "pg_dedup_plan failed: " + str(plan.get("msg"))[:500]
        return out
    out["deploy_id"] = plan.get("deploy_id")
    out["plan"] = [{k: t.get(k) for k in ("schema", "table", "natural_key", "strategy", "key_nullable",
                                          "existing_constraint")} for t in plan["tables"]]
    out["server_version_num"] = int(plan["server"]["version_num"])
    return out


_MODKIT = None


def modkit():
    """tests/modkit.py: runs a library/ module's main() in-process with module_utils on ansible's path."""
    global _MODKIT
    if _MODKIT is None:
        import modkit as mk  # tests/ is on sys.path (harness)

        _MODKIT = mk
    return _MODKIT


def module_conn(ctx: dict, db: str, **extra) -> dict:
    cluster: PgCluster = ctx["cluster"]
    return {"login_host": "127.0.0.1", "login_port": cluster.port, "login_db": db, "login_user": cluster.superuser,
            "login_password": cluster.password, **extra}


def contender_bsql(ctx: dict, name: str, db: str, workdir: Path, sampler: Sampler) -> dict:
    """The migration step as roles/migrate runs it, minus ansible: the same modules' code, in this process.

    Per rendered file, in the role's order: library/pg_migrate_table.py (split_steps, run_once: one
    transaction per table with its lock retries; a table without duplicates is left untouched; then
    ANALYZE), then per planned table library/pg_unique_constraint.py (duplicate check, ALTER TABLE ...
    ADD CONSTRAINT ... UNIQUE under lock_timeout; an equivalent existing constraint is kept), with the
    arguments roles/migrate passes. Not included: the role's ledger bookkeeping tasks (size_after, one row
    per constraint), which are small single-row updates.
    """
    prep = ctx.get("prepared", {}).get(name, {})
    out: dict = {k: v for k, v in prep.items() if k != "plan"}
    if prep.get("error"):
        out.update(rc=None, timed_out=False, missing=not MIGRATE_PLAYBOOK.exists())
        return out
    sampler.rss_pid = os.getpid()  # the modules run in this process
    mk = modkit()
    plan = {t["table"]: t for t in prep["plan"]}
    tables: dict = {}
    t_all = time.monotonic()
    for f in prep["files"]:
        text = Path(f).read_text()
        head = re.search(r"^-- dedup-rollout run \S+: (.+)$", text, re.M)
        table = next((t for t in plan if head and head.group(1) == f"{plan[t]['schema']}.{t}"), None)
        if table is None:
            out.update(rc=1, error=f"cannot tell which planned table {f} migrates")
            return out
        res = mk.run_module("pg_migrate_table", module_conn(
            ctx, db, schema=plan[table]["schema"], table=table, strategy=plan[table]["strategy"], sql=text,
            retries=MIGRATE_DEFAULTS["retries"], retry_delay=MIGRATE_DEFAULTS["retry_delay"]))
        tables[table] = {"migrate_changed": res.get("changed"), "migrate_seconds": res.get("seconds"),
                         "attempts": res.get("attempts"), "ledger": res.get("ledger"),
                         "steps": res.get("steps")}
        if res.get("failed"):
            out.update(rc=1, tables=tables, error=f"pg_migrate_table {table}: {str(res.get('msg'))[:800]}")
            return out
    out["migrate_seconds"] = round(time.monotonic() - t_all, 3)
    t_con = time.monotonic()
    for t in prep["plan"]:  # the role's nulls_not_distinct expression with migrate_nulls_not_distinct: auto
        existing = t.get("existing_constraint")
        nnd = existing["nulls_not_distinct"] if existing else \
            bool(t.get("key_nullable")) and prep["server_version_num"] >= 150000
        t0 = time.monotonic()
        res = mk.run_module("pg_unique_constraint", module_conn(
            ctx, db, schema=t["schema"], table=t["table"], columns=t["natural_key"], state="present",
            nulls_not_distinct=bool(nnd), **MIGRATE_DEFAULTS))
        tables.setdefault(t["table"], {}).update(constraint=res.get("name"), constraint_action=res.get("action"),
                                                 constraint_seconds=round(time.monotonic() - t0, 3))
        if res.get("failed"):
            out.update(rc=1, tables=tables, error=f"pg_unique_constraint {t['table']}: {str(res.get('msg'))[:800]}")
            return out
    out["constraint_seconds"] = round(time.monotonic() - t_con, 3)
    out.update(rc=0, timed_out=False, tables=tables)
    return out


def prepare_repack(ctx: dict, name: str, db: str, workdir: Path) -> dict:
    """B-online-repack: the database gets the pg_repack extension (the client must be installed: bootstrap)."""
    try:
        ctx["cluster"].execute("CREATE EXTENSION IF NOT EXISTS pg_repack", db)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return {"error": f"CREATE EXTENSION pg_repack failed: {exc}"}
    return {"extension": ctx["cluster"].scalar("SELECT extversion FROM pg_extension WHERE extname = 'pg_repack'",
                                               db)}


PREPARE_FUNCS = {"B-sql-table": prepare_bsql, "B-sql-dump": prepare_bsql, "B-online-repack": prepare_repack}


CONTENDER_FUNCS = {"A1": contender_a, "A2": contender_a, "A2-dump": contender_a, "B-table": contender_b,
                   "B-dump": contender_b, "B-deploy": contender_b,
                   "B-online": contender_b, "B-online-repack": contender_b, "B-sql-table": contender_bsql,
                   "B-sql-dump": contender_bsql}


def measure(ctx: dict, name: str, scale: float, src: str, spec: dict) -> dict:
    cluster: PgCluster = ctx["cluster"]
    db = "bench_" + re.sub(r"\W", "_", name.lower())
    workdir = ctx["workdir"] / f"scale{scale}" / name
    workdir.mkdir(parents=True, exist_ok=True)
    clone(cluster, src, db)
    if name in PREPARE_FUNCS:  # not timed: e.g. render B-sql's migration with the render-only playbook
        log(f"scale {scale}: {name}: preparing (not timed) ...")
        ctx.setdefault("prepared", {})[name] = PREPARE_FUNCS[name](ctx, name, db, workdir)
    cluster.execute("CHECKPOINT")  # every contender starts from the same WAL state (full-page writes)
    lsn0 = cluster.scalar("SELECT pg_current_wal_lsn()")
    sampler = Sampler([cluster.datadir, workdir])
    writer = Writer(cluster, db)
    sampler.start()
    if name not in NO_WRITER:
        writer.start()
    time.sleep(0.3)  # the writer's first insert is in before the contender starts
    log(f"scale {scale}: {name} on {db} ...")
    t0 = time.monotonic()
    detail: dict = {"rc": None, "timed_out": False, "error": "interrupted"}
    try:
        detail = CONTENDER_FUNCS[name](ctx, name, db, workdir, sampler)
    finally:
        seconds = time.monotonic() - t0
        if detail.get("rc") is None and not detail.get("missing"):
            terminate_sessions(cluster, db)  # nothing of a killed contender keeps locks
        writer.stop()
        sampler.stop()
    lsn1 = cluster.scalar("SELECT pg_current_wal_lsn()")
    wal = cluster.scalar("SELECT pg_wal_lsn_diff(%s, %s)", params=(lsn1, lsn0))
    status = "ok" if detail.get("rc") == 0 else ("timeout" if detail.get("timed_out") else "failed")
    if detail.get("missing"):
        status = "missing"
    row = {
        "contender": name,
        "scale": scale,
        "status": status,
        "seconds": round(seconds, 2),
        "wal_mb": mb(float(wal)),
        "peak_extra_disk_mb": mb(sampler.peak_bytes - sampler.start_bytes),
        "disk_samples": sampler.samples,
        "db_size_after_mb": mb(cluster.scalar("SELECT pg_database_size(%s)", params=(db,))),
        "child_tables_size_after_mb": mb(cluster.scalar(
            "SELECT sum(pg_total_relation_size(format('%%I.%%I', %s::text, t)::regclass)) FROM unnest(%s::text[]) t",
            db, (SCHEMA, [t["name"] for t in TABLES]))),
        "child_rows": sum(t["rows"] for t in spec.values()),
        "seconds_per_million_rows": round(seconds / max(1, sum(t["rows"] for t in spec.values())) * 1e6, 3),
        "writer_max_stall_ms": round(writer.max_latency * 1000, 1),
        "writer_rows": writer.committed,
        "writer_errors": writer.errors,
        "detail": detail,
    }
    row["measures"] = MEASURES.get(name, "")
    if name.startswith("B"):
        row["ansible_peak_rss_mb"] = mb(sampler.peak_rss_max)
        row["ansible_peak_rss_tree_mb"] = mb(sampler.peak_rss_sum)
    if status == "ok":
        row["check"] = verify(cluster, db, spec, writer.committed)
        if not row["check"]["ok"]:
            row["status"] = "wrong-result"
    log(f"scale {scale}: {name} {row['status']} in {row['seconds']} s")
    if not ctx["keep"]:
        cluster.drop_database(db)
        shutil.rmtree(workdir / "backup", ignore_errors=True)
    return row


def measure_dupcheck(ctx: dict, scale: float, src: str) -> dict:
    """pg_duplicates over all tables (module time from the json callback) vs plain count(*)."""
    cluster: PgCluster = ctx["cluster"]
    db = "bench_dupcheck"
    workdir = ctx["workdir"] / f"scale{scale}" / "dupcheck"
    workdir.mkdir(parents=True, exist_ok=True)
    clone(cluster, src, db)
    out: dict = {"contender": "dupcheck", "scale": scale}

    def count_all() -> float:
        conn = cluster.connect(db)
        try:
            t0 = time.monotonic()
            with conn.cursor() as cur:
                for t in TABLES:
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SCHEMA, t["name"])))
                    cur.fetchone()
            return time.monotonic() - t0
        finally:
            conn.close()

    def group_all() -> float:
        """The query a DBA would type (issue 17's yardstick): per table, the duplicated keys and their counts."""
        conn = cluster.connect(db)
        try:
            t0 = time.monotonic()
            with conn.cursor() as cur:
                for t in TABLES:
                    keys = sql.SQL(", ").join(map(sql.Identifier, t["natural_key"]))
                    cur.execute(sql.SQL("SELECT {k}, count(*) FROM {t} GROUP BY {k} HAVING count(*) > 1").format(
                        k=keys, t=sql.Identifier(SCHEMA, t["name"])))
                    cur.fetchall()
            return time.monotonic() - t0
        finally:
            conn.close()

    count_all()  # warm the cache for both
    inv = write_inventory(workdir)
    play = workdir / "pg_duplicates.yml"
    result_file = workdir / "pg_duplicates.json"
    # ping between t0 and t1 is the baseline of one module task; pg_duplicates runs between t1 and t2.
    play.write_text(
        "- name: Bench pg_duplicates\n  hosts: db\n  gather_facts: false\n  tasks:\n"
        "    - name: Take t0\n      ansible.builtin.set_fact:\n        bench_t0: \"{{ now().timestamp() }}\"\n"
        "    - name: Run a trivial module (the baseline)\n      ansible.builtin.ping:\n"
        "    - name: Take t1\n      ansible.builtin.set_fact:\n        bench_t1: \"{{ now().timestamp() }}\"\n"
        "    - name: Count duplicates of every table\n      pg_duplicates:\n"
        "        login_host: \"{{ dedup_db_host }}\"\n        login_port: \"{{ dedup_db_port }}\"\n"
        "        login_db: \"{{ dedup_db_name }}\"\n        login_user: \"{{ dedup_db_user }}\"\n"
        "        login_password: \"{{ dedup_db_password }}\"\n        schema: \"{{ dedup_schema }}\"\n"
        "        tables: \"{{ dedup_tables }}\"\n"
        "      register: bench_dup\n      ignore_errors: true\n"
        "    - name: Take t2\n      ansible.builtin.set_fact:\n        bench_t2: \"{{ now().timestamp() }}\"\n"
        "    - name: Save the timings and the result\n      ansible.builtin.copy:\n"
        f"        dest: {json.dumps(str(result_file))}\n        mode: '0600'\n"
        "        content: \"{{ {'t0': bench_t0, 't1': bench_t1, 't2': bench_t2, 'result': bench_dup} | to_json }}\"\n"
    )
    varsfile = write_vars(ctx, db, workdir, "table")
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), str(play), "-i", str(inv),
                               "-e", f"@{varsfile}"], env=ansible_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=ctx["timeout"])
    finally:
        varsfile.unlink(missing_ok=True)
    out["playbook_seconds"] = round(time.monotonic() - t0, 2)
    out["count_seconds"] = round(count_all(), 3)
    out["group_seconds"] = round(group_all(), 3)
    try:
        doc = json.loads(result_file.read_text())
        t0_, t1_, t2_ = (float(doc[k]) for k in ("t0", "t1", "t2"))
        res = doc["result"]
        out["module_task_seconds"] = round(t2_ - t1_, 3)
        out["baseline_task_seconds"] = round(t1_ - t0_, 3)
        out["module_seconds"] = round(max(0.0, (t2_ - t1_) - (t1_ - t0_)), 3)
        out["failed"] = bool(res.get("failed"))
        keep = ("table", "total_rows", "distinct_keys", "duplicate_rows", "divergent_rows", "null_key_rows", "seconds")
        tables = res.get("tables") if isinstance(res.get("tables"), list) else []
        out["tables"] = [{k: t.get(k) for k in keep if k in t} for t in tables if isinstance(t, dict)]
        sql_seconds = [t.get("seconds") for t in tables if isinstance(t, dict)]
        if sql_seconds and all(isinstance(x, (int, float)) for x in sql_seconds):
            out["module_reported_seconds"] = round(sum(sql_seconds), 3)  # the module's own per-table timings
        if res.get("failed"):
            out["error"] = str(res.get("msg", "module failed"))[:1500]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out["failed"] = True
        out["error"] = f"{type(exc).__name__}: {exc}; rc={proc.returncode}; " + (proc.stdout + proc.stderr)[-1500:]
    if not out.get("failed") and out["count_seconds"] > 0:
        out["ratio_vs_count"] = round(out["module_seconds"] / out["count_seconds"], 2)
        if "module_reported_seconds" in out:
            out["ratio_reported_vs_count"] = round(out["module_reported_seconds"] / out["count_seconds"], 2)
    if not out.get("failed") and out.get("group_seconds", 0) > 0:
        out["ratio_vs_group"] = round(out["module_seconds"] / out["group_seconds"], 2)
        if "module_reported_seconds" in out:
            out["ratio_reported_vs_group"] = round(out["module_reported_seconds"] / out["group_seconds"], 2)
    out["status"] = "failed" if out.get("failed") else "ok"
    log(f"scale {scale}: dupcheck {out['status']} module {out.get('module_seconds')} s vs count(*) "
        f"{out['count_seconds']} s, vs GROUP BY key HAVING count(*) > 1 {out.get('group_seconds')} s "
        f"({out.get('ratio_vs_group')}x)")
    if not ctx["keep"]:
        cluster.drop_database(db)
    return out


# --------------------------------------------------------------------------- regions: N regions at once vs one

def ansible_forks() -> int | None:
    """forks as ansible-playbook will see it here (ansible.cfg, or ANSIBLE_FORKS): `ansible-config dump`."""
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "ansible-config"), "dump", "--only-changed"],
                              env=ansible_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^DEFAULT_FORKS\([^)]*\) = (\d+)$", proc.stdout, re.M)
    return int(m.group(1)) if m else 5  # not changed: ansible's default


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat (every process, not only ours)."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals) - idle, sum(vals)


def write_regions_inventory(ctx: dict, workdir: Path, dbs: list[str], run_id: str) -> tuple[Path, Path]:
    """One db host per database, each in its own region group, no etl host; returns (inventory, secret file).

    As README "Your own database, no ETL host", times N: group `db` holds bench-r<i>-db, group `etl` is empty,
    group region<i> holds bench-r<i>-db; host_vars give each host its own dedup_db_name (extra vars would
    override host_vars, so nothing goes through -e). group_vars/all/bench.yml (0600, it holds the password, deleted
    after the run) has the same settings as B-table (backup mode table), monitor_schedule false.
    """
    inv = workdir / "inventory"
    (inv / "host_vars").mkdir(parents=True, exist_ok=True)
    (inv / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    hosts = [f"bench-r{i}-db" for i in range(1, len(dbs) + 1)]
    children: dict = {"db": {"hosts": {h: None for h in hosts}}, "etl": {"hosts": {}}}
    for i, h in enumerate(hosts, 1):
        children[f"region{i}"] = {"hosts": {h: None}}
    doc = {"all": {"children": children,
                   "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}
    (inv / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    for h, db in zip(hosts, dbs):
        (inv / "host_vars" / f"{h}.yml").write_text(yaml.safe_dump({"dedup_db_name": db}))
    data = bench_vars(ctx, dbs[0], workdir, "table", {"dedup_run_id": run_id, "monitor_schedule": False})
    del data["dedup_db_name"]
    secret = inv / "group_vars" / "all" / "bench.yml"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return inv, secret


def regions_phase(ctx: dict, scale: float, src: str, spec: dict, count: int, workdir: Path) -> dict:
    """Clone src `count` times (untimed), then time one ansible-playbook deploy_dedup.yml over all of them."""
    cluster: PgCluster = ctx["cluster"]
    workdir.mkdir(parents=True, exist_ok=True)
    dbs = [f"bench_regions{count}_r{i}" for i in range(1, count + 1)]
    for db in dbs:
        clone(cluster, src, db)
    run_id = f"bench-{ctx['workdir'].name.removeprefix('run-')}-regions{count}"
    inv, secret = write_regions_inventory(ctx, workdir, dbs, run_id)
    logfile = workdir / "ansible.log"
    timer_file = workdir / "task_times.json"
    cluster.execute("CHECKPOINT")  # the same WAL state for both phases
    lsn0 = cluster.scalar("SELECT pg_current_wal_lsn()")
    sampler = Sampler([])  # RSS of the ansible-playbook tree only
    sampler.start()
    load0, cpu0 = os.getloadavg(), cpu_times()
    log(f"scale {scale}: regions: deploy_dedup.yml on {count} region(s) ({', '.join(dbs)}) ...")
    t0 = time.monotonic()
    rc, timed_out = None, False
    try:
        rc, timed_out = run_process([str(Path(sys.executable).parent / "ansible-playbook"), str(DEPLOY_PLAYBOOK),
                                     "-i", str(inv)], ansible_env(timer_env(timer_file)), logfile, ctx["timeout"],
                                    sampler=sampler, cwd=REPO)
    finally:
        seconds = time.monotonic() - t0
        load1, cpu1 = os.getloadavg(), cpu_times()
        secret.unlink(missing_ok=True)  # it holds the password
        sampler.stop()
        if rc is None:
            for db in dbs:
                terminate_sessions(cluster, db)
    wal = cluster.scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", params=(lsn0,))
    text = logfile.read_text(errors="replace")
    out: dict = {"regions": count, "databases": dbs, "run_id": run_id, "rc": rc, "timed_out": timed_out,
                 "seconds": round(seconds, 2), "wal_mb": mb(float(wal)),
                 "ansible_peak_rss_mb": mb(sampler.peak_rss_max), "ansible_peak_rss_tree_mb": mb(sampler.peak_rss_sum),
                 "recap": parse_recap(text),
                 # The whole machine while it ran (other processes included): how busy the CPUs were.
                 "machine_cpu_busy_pct": round(100.0 * (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 1)
                 if cpu1[1] > cpu0[1] else None,
                 "loadavg_1min_before_after": [round(load0[0], 2), round(load1[0], 2)]}
    out.update(task_times(timer_file, top=8))
    if timed_out or rc != 0:
        out["error"] = "timed out" if timed_out else tail(logfile, 40)
        msgs = re.findall(r"^\s*msg: (.*)$", text, re.M)
        out["error_summary"] = "timed out" if timed_out else (msgs[-1] if msgs else tail(logfile, 1))[:300]
    if not timed_out:
        out["checks"] = {}
        for db in dbs:  # no concurrent writer here: 0 writer rows expected
            chk = verify(cluster, db, spec, 0)
            tables = chk["tables"].values()
            out["checks"][db] = {"ok": chk["ok"], "duplicates": sum(t["duplicates"] for t in tables),
                                 "kept_not_oldest": sum(t["kept_not_oldest"] for t in tables),
                                 "unique_constraints": sum(bool(t["unique_constraint"]) for t in tables),
                                 "tables": len(chk["tables"]), "rows": sum(t["rows"] for t in tables),
                                 "backup_tables_rows": sum(chk["backup_tables_rows"].values())}
        out["check_ok"] = all(c["ok"] for c in out["checks"].values())
    log(f"scale {scale}: regions: {count} region(s) rc={rc} in {out['seconds']} s")
    if not ctx["keep"]:
        for db in dbs:
            cluster.drop_database(db)
    return out


def measure_regions(ctx: dict, scale: float, src: str, spec: dict) -> dict:
    """deploy_dedup.yml on 1 region, then on N regions at once (each its own clone of src): t_N / t_1."""
    n = ctx["regions"]
    workdir = ctx["workdir"] / f"scale{scale}" / "regions"
    forks = ansible_forks()
    one = regions_phase(ctx, scale, src, spec, 1, workdir / "1")
    many = regions_phase(ctx, scale, src, spec, n, workdir / str(n)) if one["rc"] == 0 else None
    phases = [p for p in (one, many) if p is not None]
    if any(p["timed_out"] for p in phases):
        status = "timeout"
    elif many is None or any(p["rc"] != 0 for p in phases):
        status = "failed"
    elif not all(p["check_ok"] for p in phases):
        status = "wrong-result"
    else:
        status = "ok"
    failed = next((p for p in phases if p["rc"] != 0), None)
    row = {
        "contender": "regions",
        "scale": scale,
        "status": status,
        "measures": f"deploy_dedup.yml, {n} regions at once",
        "seconds": many["seconds"] if many else one["seconds"],  # t_N (t_1 when the 1-region run failed)
        "regions": n,
        "forks": forks,
        "nproc": os.cpu_count(),
        "seconds_1": one["seconds"],
        "seconds_n": many["seconds"] if many else None,
        "ratio_n_over_1": round(many["seconds"] / one["seconds"], 2) if status == "ok" else None,
        "wal_mb": many["wal_mb"] if many else one["wal_mb"],
        "ansible_peak_rss_mb": (many or one)["ansible_peak_rss_mb"],
        "ansible_peak_rss_tree_mb": (many or one)["ansible_peak_rss_tree_mb"],
        "databases_checked": sum(len(p.get("checks", {})) for p in phases),
        "databases_ok": sum(c["ok"] for p in phases for c in p.get("checks", {}).values()),
        "detail": {"one": one, "many": many, "playbook": str(DEPLOY_PLAYBOOK.relative_to(REPO)),
                   "error_summary": failed.get("error_summary") if failed else
                   ("a database failed the end-state check" if status == "wrong-result" else None)},
    }
    log(f"scale {scale}: regions {status}: 1 region {one['seconds']} s, {n} regions "
        f"{row['seconds_n']} s, ratio {row['ratio_n_over_1']}")
    return row


def regions_text(r: dict) -> str:
    """The summary line of a regions row."""
    n = r["regions"]
    if r["status"] != "ok":
        return (f"regions at scale {r['scale']}: {r['status']}: 1 region {r['seconds_1']} s, {n} regions "
                f"{r['seconds_n']} s; {r['detail'].get('error_summary')}")
    return (f"regions at scale {r['scale']}: deploy_dedup.yml on 1 region {r['seconds_1']} s, on {n} regions at "
            f"once {r['seconds_n']} s -> t_{n} / t_1 = {r['ratio_n_over_1']} (1.0 = perfect fan-out, {n} = one "
            f"after another); forks {r['forks']}, {r['nproc']} CPU; {r['databases_ok']} of "
            f"{r['databases_checked']} databases without duplicates, oldest rows kept, every natural key UNIQUE")


# --------------------------------------------------------------------------- reporting

def machine_facts(cluster: PgCluster) -> dict:
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    settings = dict(cluster.execute(
        "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
        params=(["fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "work_mem",
                 "maintenance_work_mem", "max_wal_size", "hash_mem_multiplier", "wal_level"],)))
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pg_version": cluster.scalar("SHOW server_version"),
        "pg_settings": settings,
    }


def summarize(rows: list[dict]) -> None:
    """Ratio vs best A: (seconds of the faster completed A at that scale) / seconds (not for regions: own ratio)."""
    rows = [r for r in rows if r["contender"] != "regions"]
    for scale in {r["scale"] for r in rows}:
        a = [r["seconds"] for r in rows if r["scale"] == scale and r["contender"] in ("A1", "A2")
             and r["status"] == "ok"]
        best = min(a) if a else None
        for r in rows:
            if r["scale"] == scale and r["contender"] != "dupcheck":
                r["ratio_vs_best_a"] = round(best / r["seconds"], 2) if best and r["status"] == "ok" else None
                r["wal_ratio_vs_best_a"] = None
        seq = next((r for r in rows if r["scale"] == scale and r["contender"] == "A2-dump" and r["status"] == "ok"),
                   None)
        for r in rows:  # the whole deploy against the runbook's own sequence (its pg_dump, then A2)
            if r["scale"] == scale and r["contender"] == "B-deploy" and seq and r["status"] == "ok":
                r["ratio_vs_a2_dump"] = round(seq["seconds"] / r["seconds"], 2)
        if best:
            a_row = next(r for r in rows if r["scale"] == scale and r["contender"] in ("A1", "A2")
                         and r["seconds"] == best)
            for r in rows:
                if r["scale"] == scale and r["contender"] != "dupcheck" and r["status"] == "ok" and r["wal_mb"]:
                    r["wal_ratio_vs_best_a"] = round(a_row["wal_mb"] / r["wal_mb"], 2)


def table_text(rows: list[dict], dupchecks: list[dict]) -> str:
    hdr = ["contender", "measures", "scale", "status", "seconds", "WAL MB", "peak extra disk MB", "size after MB",
           "max writer stall ms", "time: best A / this", "WAL: best A / this", "peak RSS MB"]
    lines = []
    notes = []
    for r in rows:
        if r["contender"] == "dupcheck":
            continue
        if r["contender"] == "regions":  # seconds = t_N; its ratio t_N / t_1 is in the line under the table
            sec = r["seconds"] if r["status"] != "timeout" else f">{r['seconds']}"
            lines.append([r["contender"], r["measures"], r["scale"], r["status"], sec, r["wal_mb"], "-", "-", "-",
                          "-", "-", r.get("ansible_peak_rss_mb", "-")])
            notes.append(regions_text(r))
            continue
        ratio = r.get("ratio_vs_best_a")
        wal_ratio = r.get("wal_ratio_vs_best_a")
        sec = r["seconds"] if r["status"] != "timeout" else f">{r['seconds']}"
        lines.append([r["contender"], r.get("measures") or MEASURES.get(r["contender"], ""), r["scale"], r["status"],
                      sec, r["wal_mb"], r["peak_extra_disk_mb"], r["db_size_after_mb"], r["writer_max_stall_ms"],
                      "-" if ratio is None else f"{ratio}x", "-" if wal_ratio is None else f"{wal_ratio}x",
                      r.get("ansible_peak_rss_mb", "-")])
        if r["status"] not in ("ok",):
            why = r["detail"].get("error_summary") or str(r["detail"].get("error", ""))[:300]
            notes.append(f"{r['contender']} at scale {r['scale']}: {r['status']}: {why}")
    cells = [hdr] + [[str(c) for c in ln] for ln in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(hdr))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    out = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in cells[1:]]
    out += notes
    for r in rows:
        if r["contender"] == "B-deploy" and r.get("ratio_vs_a2_dump"):
            seq = next(x for x in rows if x["contender"] == "A2-dump" and x["scale"] == r["scale"])
            out.append(f"deploy_dedup.yml at scale {r['scale']}: {r['seconds']} s vs the runbook's sequence (pg_dump "
                       f"{seq['detail'].get('pg_dump_seconds')} s + A2) {seq['seconds']} s -> "
                       f"{r['ratio_vs_a2_dump']}x (above 1: the deploy is faster)")
    for d in dupchecks:
        if d.get("status") == "ok":
            out.append(f"\npg_duplicates at scale {d['scale']}: module task {d['module_seconds']} s (net of a ping "
                       f"task; its own SQL timings {d.get('module_reported_seconds')} s) vs plain count(*) "
                       f"{d['count_seconds']} s -> {d.get('ratio_vs_count')}x "
                       f"(SQL only {d.get('ratio_reported_vs_count')}x; playbook wall {d['playbook_seconds']} s); "
                       f"vs the DBA's SELECT key, count(*) ... GROUP BY key HAVING count(*) > 1 "
                       f"{d.get('group_seconds')} s -> {d.get('ratio_vs_group')}x "
                       f"(SQL only {d.get('ratio_reported_vs_group')}x)")
        else:
            out.append(f"\npg_duplicates at scale {d['scale']}: {d.get('status')}: {str(d.get('error'))[:300]}")
    return "\n".join(out)


def explain_text(explains: dict) -> str:
    out = []
    for scale, ex in explains.items():
        parts = []
        for tbl, modes in ex.items():
            parts.append(f"{tbl}: A1 {'hashed' if modes['A1']['hashed_subplan'] else 'NOT hashed'}"
                         f", A2 {'hashed' if modes['A2']['hashed_subplan'] else 'NOT hashed'}")
        out.append(f"NOT IN subplan at scale {scale}: " + "; ".join(parts))
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.1, help="fraction of the runbook's row counts (default 0.1)")
    p.add_argument("--sweep", help="comma-separated scales, e.g. 0.025,0.05,0.1 (overrides --scale)")
    p.add_argument("--quick", action="store_true", help="smoke run at scale 0.01")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma-separated subset of {','.join(ALL_CONTENDERS)} (default {DEFAULT_CONTENDERS})")
    p.add_argument("--regions", type=int, default=4,
                   help="regions contender: N regions at once, timed against 1 (default 4, at least 2)")
    p.add_argument("--keep", action="store_true", help="keep the cluster, clones and work files")
    p.add_argument("--timeout", type=float, default=900, help="per-contender limit in seconds (default 900)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results", help="where the JSON goes")
    p.add_argument("--workdir", type=Path, default=BENCH / "work", help="cluster and scratch files (gitignored)")
    args = p.parse_args(argv)
    if args.sweep:
        args.scales = [float(s) for s in args.sweep.split(",") if s.strip()]
    else:
        args.scales = [0.01 if args.quick else args.scale]
    args.contender_list = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.regions < 2:
        p.error("--regions must be at least 2 (the contender times N regions against 1)")
    bad = [c for c in args.contender_list if c not in ALL_CONTENDERS]
    if bad:
        p.error(f"unknown contenders: {', '.join(bad)} (choose from {', '.join(ALL_CONTENDERS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A plain kill (SIGTERM) unwinds like Ctrl-C: the finally blocks stop the cluster and clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    workroot = args.workdir.resolve()
    cluster = start_bench_cluster(workroot)
    ctx = {"cluster": cluster, "keep": args.keep, "timeout": args.timeout, "regions": args.regions,
           "workdir": workroot / f"run-{stamp}"}
    ctx["workdir"].mkdir(parents=True, exist_ok=True)
    log(f"cluster {cluster.root} on port {cluster.port} (PostgreSQL {cluster.version}, default durability)")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_facts(cluster)
    runs = []
    all_rows: list[dict] = []
    all_dup: list[dict] = []
    try:
        for scale in args.scales:
            src = "bench_src"
            log(f"scale {scale}: building the runbook-shaped database ...")
            build = build_source(cluster, src, scale, ctx["workdir"])
            log(f"scale {scale}: built in {build['seconds']} s, {build['db_size_mb']} MB")
            explains = explain_a(cluster, src)
            rows = [measure_regions(ctx, scale, src, build["tables"]) if c == "regions"
                    else measure(ctx, c, scale, src, build["tables"]) for c in args.contender_list if c != "dupcheck"]
            dups = [measure_dupcheck(ctx, scale, src)] if "dupcheck" in args.contender_list else []
            summarize(rows)
            doc = {"generated_at": stamp, "scale": scale, "machine": machine, "build": build,
                   "contenders": rows, "pg_duplicates": dups[0] if dups else None, "explain_a_delete": explains,
                   "table": table_text(rows, dups)}
            (args.results_dir / f"{stamp}-scale{scale}.json").write_text(json.dumps(doc, indent=2) + "\n")
            runs.append(doc)
            all_rows += rows
            all_dup += dups
            if not args.keep:
                cluster.drop_database(src)
        latest = {"generated_at": stamp, "machine": machine, "scales": args.scales,
                  "contenders": args.contender_list, "runs": runs, "table": table_text(all_rows, all_dup)}
        (args.results_dir / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
        print()
        print(f"machine: {machine['nproc']} CPU ({machine['cpu']}), {machine['ram_gb']} GB RAM, "
              f"PostgreSQL {machine['pg_version']}")
        print(latest["table"])
        print(explain_text({r["scale"]: r["explain_a_delete"] for r in runs}))
        print(f"\nJSON: {args.results_dir / 'latest.json'}")
    finally:
        if args.keep:
            log(f"kept: cluster {cluster.root} port {cluster.port}, work files {ctx['workdir']}")
        else:
            cluster.stop("fast")
            shutil.rmtree(cluster.root, ignore_errors=True)
            shutil.rmtree(ctx["workdir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
