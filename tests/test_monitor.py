"""Post-deploy monitoring: playbooks/monitor.yml, the scheduled check (scripts/dedup_check.py) and its cron file.

Real parts only: the harness cluster, a real deploy of the lab, the real ansible-playbook, a real cron.d file,
the script run exactly as its cron line says. The clock of the scheduled check is injected (DEDUP_NOW / --now).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from psycopg2 import sql

from harness import REPO, require_root

DEPLOY = REPO / "deploy_dedup.yml"
MONITOR = REPO / "playbooks" / "monitor.yml"
SCRIPT = REPO / "scripts" / "dedup_check.py"
LEDGER = "dedup_rollout"
CRON_DIR = Path("/etc/cron.d")

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


# --------------------------------------------------------------------------- helpers


def parse_textfile(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Parse a node-exporter textfile strictly (exposition format 0.0.4); fail on any malformed line."""
    out: dict[str, list[tuple[dict, float]]] = {}
    typed = set()
    assert text.endswith("\n"), "a textfile must end with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4, line
            if parts[1] == "TYPE":
                assert parts[3] in ("gauge", "counter", "untyped"), line
                typed.add(parts[2])
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = {}
        rest = m.group("labels") or ""
        pos = 0
        while pos < len(rest):
            lm = LABEL.match(rest, pos)
            assert lm, f"bad labels in {line!r}"
            labels[lm.group(1)] = lm.group(2)
            pos = lm.end()
        assert m.group("name") in typed, f"sample before its TYPE: {line!r}"
        out.setdefault(m.group("name"), []).append((labels, float(m.group("value"))))
    return out


def by_table(metrics, name: str) -> dict[str, tuple[dict, float]]:
    return {lab["table"]: (lab, value) for lab, value in metrics[name]}


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deploy(lab) -> tuple[str, dt.datetime]:
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-5000:]
    rows = lab.query(sql.SQL("SELECT run_id, finished_at FROM {} WHERE kind = 'deploy' AND status = 'succeeded' "
                             "ORDER BY started_at DESC").format(sql.Identifier(LEDGER, "runs")))
    assert rows, "the deploy recorded no succeeded run"
    return rows[0][0], rows[0][1]


def cron_job(path: Path) -> tuple[str, str, str]:
    """(schedule, user, command) of the only job line of a cron.d file."""
    jobs = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(jobs) == 1, jobs
    f = jobs[0].split(None, 6)
    return " ".join(f[:5]), f[5], f[6]


def run_cron_job(path: Path, now: str | None = None) -> subprocess.CompletedProcess:
    """Run the job exactly as cron would (sh -c), with an injected clock."""
    _, _, command = cron_job(path)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    if now:
        env["DEDUP_NOW"] = now
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def check_files(tmp_path):
    """Where the scheduled check goes: a unique real /etc/cron.d file, the rest under tmp_path."""
    require_root("the scheduled check writes /etc/cron.d")
    name = "t" + uuid.uuid4().hex[:10]
    files = {
        "name": name,
        "cron": CRON_DIR / f"dedup-check-{name}",
        "textfile_dir": tmp_path / "textfile",
        "config_dir": tmp_path / "etc",
        "log_dir": tmp_path / "log",
        "script_dir": tmp_path / "bin",
    }
    files["textfile"] = files["textfile_dir"] / f"dedup_check_{name}.prom"
    files["config"] = files["config_dir"] / f"check-{name}.json"
    files["pgpass"] = files["config_dir"] / f"check-{name}.pgpass"
    files["log"] = files["log_dir"] / f"check-{name}.log"
    files["extra_vars"] = {
        "monitor_schedule": True,  # labkit's inventories turn the schedule off by default
        "monitor_check_name": name,
        "monitor_cron_dir": str(CRON_DIR),
        "monitor_textfile_dir": str(files["textfile_dir"]),
        "monitor_check_config_dir": str(files["config_dir"]),
        "monitor_check_log_dir": str(files["log_dir"]),
        "monitor_check_script_dir": str(files["script_dir"]),
        "monitor_schedule_minute": 7,
    }
    try:
        yield files
    finally:
        files["cron"].unlink(missing_ok=True)


# --------------------------------------------------------------------------- the script alone (fast)


def test_check_script_phases_textfile_and_retirement(pg, fresh_db, tmp_path):
    """dedup_check.py on a small database: hourly -> daily -> gone, textfile parseable, exit codes."""
    pg.execute("CREATE SCHEMA s; "
               "CREATE TABLE s.good (id serial PRIMARY KEY, a int NOT NULL, b int NOT NULL, UNIQUE (b, a)); "
               "CREATE TABLE s.bad (id serial PRIMARY KEY, a int, b int); "
               "INSERT INTO s.good (a, b) VALUES (1, 1), (1, 2); "
               "INSERT INTO s.bad (a, b) VALUES (1, 1), (1, 1), (1, 1), (2, NULL), (2, NULL), (3, 3);", fresh_db)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:{pg.port}:{fresh_db}:{pg.superuser}:{pg.password}\n")
    passfile.chmod(0o600)
    cron = tmp_path / "cron.d" / "dedup-check-unit"
    cron.parent.mkdir()
    start = dt.datetime(2025, 12, 2, 10, 0, tzinfo=dt.timezone.utc)
    cfg = {
        "name": "unit", "environment": "test", "host": "db1", "deploy_run_id": "20251202T100000Z",
        "period_start": iso(start), "hourly_hours": 48, "days": 7, "minute": 7, "daily_hour": 6,
        "cron_user": "root", "cron_file": str(cron), "config_path": str(tmp_path / "check.json"),
        "command": [sys.executable, str(SCRIPT), "--config", str(tmp_path / "check.json")],
        "log_file": str(tmp_path / "check.log"), "textfile": str(tmp_path / "dedup_check_unit.prom"),
        "schema": "s", "backup_schema": "dedup_rollout",
        "tables": [{"name": "good", "natural_key": ["a", "b"], "constraint": ""},
                   {"name": "bad", "natural_key": ["a", "b"], "constraint": "bad_a_b_key"}],
        "db": {"host": "127.0.0.1", "port": pg.port, "dbname": fresh_db, "user": pg.superuser,
               "passfile": str(passfile)},
    }
    Path(cfg["config_path"]).write_text(json.dumps(cfg))

    def script(*args, now):
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        return subprocess.run([sys.executable, str(SCRIPT), "--config", cfg["config_path"], "--now", now, *args],
                              env=env, capture_output=True, text=True, timeout=120)

    # schedule: hourly during the first 48 h, written once (a second call changes nothing)
    first = script("schedule", now=iso(start + dt.timedelta(hours=1)))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changed"] is True
    again = json.loads(script("schedule", now=iso(start + dt.timedelta(hours=2))).stdout)
    assert again["changed"] is False and again["phase"] == "hourly"
    when, user, command = cron_job(cron)
    assert (when, user) == ("7 * * * *", "root")
    assert pg.password not in cron.read_text()
    assert stat.S_IMODE(cron.stat().st_mode) == 0o644
    dry = json.loads(script("schedule", "--dry-run", now=iso(start + dt.timedelta(days=3))).stdout)
    assert dry == {**dry, "changed": True, "phase": "daily"}
    assert cron_job(cron)[0] == "7 * * * *", "--dry-run changed the cron file"

    # a run with a duplicate and a missing constraint: exit 1, the textfile says which table
    run = script("run", now=iso(start + dt.timedelta(hours=3)))
    assert run.returncode == 1, run.stdout + run.stderr
    metrics = parse_textfile(Path(cfg["textfile"]).read_text())
    dups = by_table(metrics, "dedup_duplicate_rows")
    assert dups["good"][1] == 0 and dups["bad"][1] == 3  # (1,1) x3 -> 2, (2,NULL) x2 -> 1 (NULLs not distinct)
    present = by_table(metrics, "dedup_constraint_present")
    assert present["good"][1] == 1 and present["good"][0]["constraint"] == "good_b_a_key"
    assert present["bad"][1] == 0 and present["bad"][0]["constraint"] == "bad_a_b_key"
    assert metrics["dedup_check_success"][0][1] == 1
    assert metrics["dedup_check_last_run_timestamp_seconds"][0][1] == (start + dt.timedelta(hours=3)).timestamp()
    log = Path(cfg["log_file"]).read_text().splitlines()
    assert "status=PROBLEM" in log[-1] and "s.bad" in log[-1] and "s.good" not in log[-1]
    assert not list(tmp_path.glob(".dedup_check_unit.prom.*")), "temp file of the atomic write left behind"

    # fixed table: exit 0; after 48 h the run switches its own cron line to daily
    pg.execute("DELETE FROM s.bad WHERE a IN (1, 2) AND id NOT IN (SELECT min(id) FROM s.bad GROUP BY a, b); "
               "ALTER TABLE s.bad ADD CONSTRAINT bad_a_b_key UNIQUE NULLS NOT DISTINCT (a, b);", fresh_db)
    run = script("run", now=iso(start + dt.timedelta(days=3)))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "status=clean" in run.stdout and "phase=daily" in run.stdout
    assert cron_job(cron)[0] == "7 6 * * *"
    assert all(v == 0 for _, v in parse_textfile(Path(cfg["textfile"]).read_text())["dedup_duplicate_rows"])

    # the database is gone: exit 2, dedup_check_success 0, still parseable
    broken = dict(cfg, db=dict(cfg["db"], port=1))
    Path(cfg["config_path"]).write_text(json.dumps(broken))
    run = script("run", now=iso(start + dt.timedelta(days=4)))
    assert run.returncode == 2
    metrics = parse_textfile(Path(cfg["textfile"]).read_text())
    assert metrics["dedup_check_success"][0][1] == 0 and "dedup_duplicate_rows" not in metrics
    assert "status=error" in Path(cfg["log_file"]).read_text().splitlines()[-1]

    # end of the period: it removes its cron file, textfile, pgpass file and config, and says so
    run = script("run", now=iso(start + dt.timedelta(days=7, minutes=1)))
    assert run.returncode == 0, run.stderr
    for p in (cron, Path(cfg["textfile"]), passfile, Path(cfg["config_path"])):
        assert not p.exists(), p
    assert "status=ended" in Path(cfg["log_file"]).read_text().splitlines()[-1]


# --------------------------------------------------------------------------- on a deployed lab


def test_monitor_and_scheduled_check_on_a_deployed_lab(lab, check_files):
    run_id, finished = deploy(lab)
    report_dir = lab.root / "reports" / lab.inventory.name / run_id

    # 1. monitor on the clean deployed lab passes, appends to the deploy's report
    res = lab.playbook(MONITOR)
    assert res.rc == 0, res.output[-5000:]
    assert res.changed() == 1  # only the creation of dedup_rollout.monitor_checks
    lines = (report_dir / "monitor.jsonl").read_text().splitlines()
    assert len(lines) == 1
    first = json.loads(lines[0])
    assert first["clean"] is True and first["deploy_run_id"] == run_id and first["problems"] == []
    assert {t["table"] for t in first["tables"]} == set(lab.tables)
    assert all(t["duplicate_rows"] == 0 and t["constraint_present"] and t["bytes"] > 0 for t in first["tables"])
    assert first["database_size"] > 0 and first["etl"][0]["active_lines"]
    checks = lab.query(sql.SQL("SELECT source, clean, deploy_run_id FROM {}").format(
        sql.Identifier(LEDGER, "monitor_checks")))
    assert checks == [("playbook", True, run_id)]

    # 2. the scheduled check: installed once, twice is still one cron file with one job
    ev = check_files["extra_vars"]
    res = lab.playbook(MONITOR, "--tags", "schedule", extra_vars=ev)
    assert res.rc == 0, res.output[-5000:]
    assert res.changed() > 0
    res = lab.playbook(MONITOR, "--tags", "schedule", extra_vars=ev)
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    marked = [p for p in CRON_DIR.iterdir() if f"dedup-check:{check_files['name']}" in p.read_text(errors="replace")]
    assert marked == [check_files["cron"]]
    when, user, _ = cron_job(check_files["cron"])
    assert (when, user) == ("7 * * * *", "root")  # within 48 h of the deploy: hourly
    for secret_free in (check_files["cron"], check_files["config"]):
        assert lab.password not in secret_free.read_text()
    assert stat.S_IMODE(check_files["pgpass"].stat().st_mode) == 0o600
    assert stat.S_IMODE(check_files["config"].stat().st_mode) == 0o600
    script = check_files["script_dir"] / "dedup_check.py"
    assert script.read_bytes() == SCRIPT.read_bytes() and stat.S_IMODE(script.stat().st_mode) == 0o755

    # 2b. hand edits are put back: --check says so and changes nothing, the run restores every file, then changed=0
    good = {k: check_files[k].read_bytes() for k in ("cron", "config", "pgpass")}
    check_files["config"].write_text(json.dumps({**json.loads(good["config"]), "hourly_hours": 1}))
    with check_files["cron"].open("a") as fh:
        fh.write("* * * * * root echo hand-edited\n")
    os.chmod(check_files["pgpass"], 0o644)
    script.write_text("#!/bin/sh\necho hand-edited\n")
    edited = {k: check_files[k].read_bytes() for k in ("cron", "config")}
    res = lab.playbook(MONITOR, "--tags", "schedule", "--check", extra_vars=ev)
    assert res.rc == 0 and res.changed() == 1, res.output[-5000:]
    flat = " ".join(res.output.split())  # the callback folds long messages
    said = flat[flat.index("Would install the scheduled check"):][:1500]
    assert all(w in said for w in ("Would change:", "script", "config", "mode of pgpass file", "cron file")), said
    assert lab.password not in res.output
    assert {k: check_files[k].read_bytes() for k in ("cron", "config")} == edited, "--check changed a file"
    assert stat.S_IMODE(check_files["pgpass"].stat().st_mode) == 0o644
    res = lab.playbook(MONITOR, "--tags", "schedule", extra_vars=ev)
    assert res.rc == 0 and res.changed() == 1, res.output[-5000:]
    assert {k: check_files[k].read_bytes() for k in ("cron", "config", "pgpass")} == good
    assert stat.S_IMODE(check_files["pgpass"].stat().st_mode) == 0o600
    assert stat.S_IMODE(check_files["config"].stat().st_mode) == 0o600
    assert script.read_bytes() == SCRIPT.read_bytes() and stat.S_IMODE(script.stat().st_mode) == 0o755
    assert not list(check_files["config_dir"].glob(".*.tmp")), "a temp file was left behind"
    res = lab.playbook(MONITOR, "--tags", "schedule", extra_vars=ev)
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    assert "Nothing to change." in " ".join(res.output.split())
    # a monitor_cron_dir that is a file: refused with the reason, nothing of that check written
    not_a_dir = check_files["config_dir"].parent / "cron.d-file"
    not_a_dir.write_text("")
    res = lab.playbook(MONITOR, "--tags", "schedule",
                       extra_vars={**ev, "monitor_cron_dir": str(not_a_dir), "monitor_check_name": "other"})
    assert res.rc != 0, res.output[-5000:]
    assert f"monitor_cron_dir {not_a_dir} on lab-db exists but is not a directory" in " ".join(res.output.split())
    assert not list(check_files["config_dir"].glob("check-other.*")) and not_a_dir.read_text() == ""

    run = run_cron_job(check_files["cron"])
    assert run.returncode == 0, run.stderr + check_files["log"].read_text()
    metrics = parse_textfile(check_files["textfile"].read_text())
    assert {t: v for t, (_, v) in by_table(metrics, "dedup_duplicate_rows").items()} == dict.fromkeys(lab.tables, 0)
    present = by_table(metrics, "dedup_constraint_present")
    assert all(v == 1 for _, v in present.values())
    assert present["task_comments"][0]["constraint"] == "task_comments_task_pk_comment_id_key"
    assert "status=clean" in check_files["log"].read_text()

    # 3. a duplicate inserted by hand into a table whose constraint was dropped
    lab.query(sql.SQL("ALTER TABLE {} DROP CONSTRAINT task_comments_task_pk_comment_id_key").format(
        sql.Identifier(lab.schema, "task_comments")))
    lab.query(sql.SQL("INSERT INTO {t} (task_pk, comment_id, region_code, body) "
                      "SELECT task_pk, comment_id, region_code, body FROM {t} ORDER BY id LIMIT 1").format(
        t=sql.Identifier(lab.schema, "task_comments")))
    res = lab.playbook(MONITOR)
    assert res.rc != 0
    failure = next(line for line in res.output.splitlines() if "FAILED:" in line)
    assert "task_comments: 1 duplicate rows" in failure
    assert "task_comments: no valid UNIQUE constraint on (task_pk, comment_id)" in failure
    assert not any(t in failure for t in lab.tables if t != "task_comments")
    last = json.loads((report_dir / "monitor.jsonl").read_text().splitlines()[-1])
    assert last["clean"] is False and last["missing_constraints"] == ["task_comments"]
    (clean,) = lab.query(sql.SQL("SELECT clean FROM {} ORDER BY check_id DESC LIMIT 1").format(
        sql.Identifier(LEDGER, "monitor_checks")))[0]
    assert clean is False

    run = run_cron_job(check_files["cron"])
    assert run.returncode == 1
    metrics = parse_textfile(check_files["textfile"].read_text())
    assert by_table(metrics, "dedup_duplicate_rows")["task_comments"][1] == 1
    assert by_table(metrics, "dedup_constraint_present")["task_comments"][1] == 0

    # 4. the clock moves on: daily after 48 h, gone after 7 days; re-installing then installs nothing
    run = run_cron_job(check_files["cron"], now=iso(finished + dt.timedelta(days=3)))
    assert run.returncode == 1
    assert cron_job(check_files["cron"])[0] == "7 6 * * *"
    run = run_cron_job(check_files["cron"], now=iso(finished + dt.timedelta(days=7, hours=1)))
    assert run.returncode == 0, run.stderr
    for key in ("cron", "textfile", "pgpass", "config"):
        assert not check_files[key].exists(), key
    assert "status=ended" in check_files["log"].read_text().splitlines()[-1]
    res = lab.playbook(MONITOR, "--tags", "schedule",
                       extra_vars={**ev, "dedup_now": iso(finished + dt.timedelta(days=8))})
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    assert not check_files["cron"].exists()
