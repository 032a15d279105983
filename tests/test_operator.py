"""The operator's view on the lab (real parts): the summary at the end of a deploy and a rollback, a rollback with
nothing left to undo is green (rc 0, changed=0, with and without ETL hosts), the rollback retires the deploy's
scheduled check (in a custom monitor_cron_dir the monitor role creates), show_report.py on both kinds of report."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from harness import REPO, run_playbook

DEPLOY = REPO / "deploy_dedup.yml"
ROLLBACK = REPO / "rollback.yml"
SHOW = REPO / "scripts" / "show_report.py"


def flat(text: str) -> str:
    return " ".join(text.split())


def db_only_inventory(lab):
    """The lab's inventory without the etl group (a database-only environment)."""
    inv = lab.root / "dbonly"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "group_vars" / "all").symlink_to(lab.inventory / "group_vars" / "all")
    hosts = yaml.safe_load((lab.inventory / "hosts.yml").read_text())
    del hosts["all"]["children"]["etl"]
    (inv / "hosts.yml").write_text(yaml.safe_dump(hosts))
    return inv


def show(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHOW), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_summary_rollback_twice_green_and_the_check_retired(lab, tmp_path):
    cron_dir = tmp_path / "cron.d-custom"        # does not exist: the monitor role creates it
    files = {"monitor_schedule": True, "monitor_check_name": "op", "monitor_cron_dir": str(cron_dir),
             "monitor_textfile_dir": str(tmp_path / "textfile"), "monitor_check_config_dir": str(tmp_path / "etc"),
             "monitor_check_log_dir": str(tmp_path / "log"), "monitor_check_script_dir": str(tmp_path / "bin"),
             "monitor_schedule_minute": 7}
    cron_file = cron_dir / "dedup-check-op"
    config = tmp_path / "etc" / "check-op.json"
    counts = lab.counts()

    # 1. deploy: the scheduled check is installed; the play ends with the before/after table
    res = lab.playbook(DEPLOY, extra_vars=files)
    assert res.rc == 0, res.output[-5000:]
    assert cron_file.is_file() and config.is_file()
    assert stat.S_IMODE(cron_dir.stat().st_mode) == 0o755
    deploy_id = json.loads(config.read_text())["deploy_run_id"]
    out = res.stdout
    summary = out[out.index("TASK [report : Show the summary of the run"):]
    assert f"deploy run {deploy_id} on {lab.inventory.name}" in summary
    assert "table" in summary and "rows before" in summary and "seconds" in summary and "constraint" in summary
    assert f"backup: {lab.backup_dir}/" in summary
    for t in lab.tables:
        assert any(line.strip().startswith(t + " ") for line in summary.splitlines()), t
    removed = sum(counts.values()) - sum(lab.counts().values())
    assert f"removed {removed} row(s) in {len(lab.tables)} table(s)" in summary
    assert "TASK [report : Hand the summary to AWX (set_stats)]" in out

    # show_report.py prints the same table from the report file
    deploy_report = lab.root / "reports" / lab.inventory.name / deploy_id / "report.json"
    shown = show(deploy_report)
    assert shown.returncode == 0, shown.stderr
    assert f"removed {removed} row(s)" in shown.stdout and "seconds" in shown.stdout

    # 2. rollback: rows back, the check retired (cron file, config, pgpass gone), the summary at the end
    res = lab.playbook(ROLLBACK, extra_vars=files)
    assert res.rc == 0, res.output[-5000:]
    assert lab.counts() == counts
    assert not cron_file.exists() and not config.exists()
    assert not (tmp_path / "etc" / "check-op.pgpass").exists()
    summary = res.stdout[res.stdout.index("TASK [rollback_report : Show the summary of the rollback"):]
    assert f"rollback run {deploy_id}-rollback" in summary and f"deploy {deploy_id} rolled back" in summary
    assert f"put back {removed} row(s) in" in summary
    assert "ETL lab-etl: current v2 -> v1" in summary

    # 3. again, with and without ETL hosts: nothing left to undo is green and changes nothing
    for inventory in (lab.inventory, db_only_inventory(lab)):
        res = run_playbook(ROLLBACK, inventory=inventory, extra_vars=files)
        assert res.rc == 0 and res.changed() == 0, (inventory, res.output[-5000:])
        assert "Nothing to roll back: the last deploy is already rolled back" in flat(res.output), res.output[-3000:]
        assert f"deploy {deploy_id} is rolled_back, by rollback {deploy_id}-rollback (succeeded" in flat(res.output)
        assert f"nothing to roll back, the last deploy {deploy_id} is already rolled back" in res.stdout
    assert lab.counts() == counts and not cron_file.exists()

    # 4. show_report.py: a rollback report, and --latest picks the newest report of either kind
    reports = sorted((lab.root / "reports" / lab.inventory.name / f"{deploy_id}-rollback").glob("*/report.json"))
    first = show(reports[0])
    assert first.returncode == 0, first.stderr
    assert f"rollback run {deploy_id}-rollback" in first.stdout and f"put back {removed} row(s)" in first.stdout
    latest = show("--latest", lab.root / "reports" / lab.inventory.name)
    assert latest.returncode == 0, latest.stderr
    assert f"nothing to roll back, the last deploy {deploy_id} is already rolled back" in latest.stdout


def test_check_script_retires_itself_once_the_deploy_is_rolled_back(pg, fresh_db, tmp_path):
    """dedup_check.py run: the ledger says rolled_back -> cron file, config, pgpass, textfile removed, exit 0; a
    missing cron directory is a clear message, not a traceback."""
    pg.execute("CREATE SCHEMA dedup_rollout; CREATE TABLE dedup_rollout.runs (run_id text PRIMARY KEY, status text); "
               "INSERT INTO dedup_rollout.runs VALUES ('20261125T211806Z', 'succeeded'); "
               "CREATE SCHEMA s; CREATE TABLE s.t (id serial PRIMARY KEY, a int UNIQUE);", fresh_db)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:{pg.port}:{fresh_db}:{pg.superuser}:{pg.password}\n")
    passfile.chmod(0o600)
    cfg = {"name": "rb", "deploy_run_id": "20261125T211806Z", "period_start": "2026-11-25T21:20:00Z",
           "cron_file": str(tmp_path / "cron.d" / "dedup-check-rb"), "config_path": str(tmp_path / "check.json"),
           "textfile": str(tmp_path / "rb.prom"), "log_file": str(tmp_path / "check.log"), "schema": "s",
           "backup_schema": "dedup_rollout", "tables": [{"name": "t", "natural_key": ["a"]}],
           "db": {"host": "127.0.0.1", "port": pg.port, "dbname": fresh_db, "user": pg.superuser,
                  "passfile": str(passfile)}}
    (tmp_path / "check.json").write_text(json.dumps(cfg))
    script = [sys.executable, str(REPO / "scripts" / "dedup_check.py"), "--config", cfg["config_path"],
              "--now", "2026-11-25T22:00:00Z"]

    missing = subprocess.run([*script, "schedule"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"the cron directory {tmp_path / 'cron.d'} does not exist" in missing.stderr

    (tmp_path / "cron.d").mkdir()
    assert subprocess.run([*script, "schedule"], capture_output=True, text=True, timeout=60).returncode == 0
    clean = subprocess.run([*script, "run"], capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and "status=clean" in clean.stdout, clean.stdout + clean.stderr
    assert Path(cfg["cron_file"]).exists()

    pg.execute("UPDATE dedup_rollout.runs SET status = 'rolled_back'", fresh_db)
    ended = subprocess.run([*script, "run"], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert "status=ended deploy rolled back" in ended.stdout
    for path in (cfg["cron_file"], cfg["config_path"], cfg["textfile"], passfile):
        assert not Path(path).exists(), path


def test_start_at_task_past_preflight_is_refused_before_anything_changes(lab):
    """--start-at-task skips every task before the one named, preflight included: the steps that need its plan
    and its run lock stop at their argument check (the preflight contract in their argument_specs)."""
    counts, cron, release = lab.counts(), lab.crontab(), lab.current_release()
    res = lab.playbook(DEPLOY, "--start-at-task", "Deduplicate and constrain the tables (step 4)")
    assert res.rc != 0, res.output[-4000:]
    text = flat(res.output)
    assert "preflight_plan" in text and "preflight_deploy_id" in text, text[-3000:]
    assert (lab.counts(), lab.crontab(), lab.current_release()) == (counts, cron, release)
    assert lab.query("SELECT to_regclass('dedup_rollout.runs')")[0][0] is None

    # Started at the ETL deploy: refused with the reason, the release and the crontab untouched.
    res = lab.playbook(DEPLOY, "--start-at-task", "Deploy the fixed ETL release (step 6)")
    assert res.rc != 0, res.output[-4000:]
    assert "(--start-at-task past them, or --skip-tags always?)" in flat(res.output), res.output[-3000:]
    assert (lab.counts(), lab.crontab(), lab.current_release()) == (counts, cron, release)
