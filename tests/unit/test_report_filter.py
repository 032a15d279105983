"""plugins/filter/report.py: the end-of-run summary (pure, no cluster)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dedup_report_filter", REPO / "plugins" / "filter" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

DEPLOY = {
    "kind": "deploy", "run_id": "20261125T211806Z", "environment": "lab", "check_mode": False,
    "finished": "2026-11-25T21:19:00Z",
    "databases": [{
        "host": "lab-db", "database": "breezeway", "server": "127.0.0.1:55432", "deploy_id": "20261125T211806Z",
        "backup": {"path": "/b/breezeway.dump", "bytes": 526336, "sha256": "0268ac099cd1bcc9ffff"},
        "database_size_before": 15099494, "database_size_after": 14470348,
        "tables": [
            {"table": "task_requirements", "rows_before": 24208, "rows_after": 28, "removed": 24180,
             "duplicates_after": 0, "size_before": 4089446, "size_after": 65536, "seconds": 0.41,
             "constraint": "task_requirements_task_pk_requirement_id_key"},
            {"table": "task_tags", "rows_before": 52, "rows_after": 52, "removed": 0, "duplicates_after": 0,
             "size_before": 65536, "size_after": 65536, "seconds": "-", "constraint": "task_tags_unique"},
        ],
    }],
    "etl_hosts": [{"host": "lab-etl", "paused_lines": ["a", "b"], "release_before": "v1", "release_now": "v2",
                   "smoke": {"status": "passed"}}],
}

ROLLBACK = {
    "kind": "rollback", "run_id": "20261125T211806Z-rollback", "environment": "lab", "check_mode": False,
    "finished": "2026-11-25T21:30:00Z",
    "databases": [{
        "host": "lab-db", "database": "breezeway", "server": "127.0.0.1:55432",
        "target_deploy": "20261125T211806Z", "target_status_before": "succeeded", "dump": "/b/breezeway.dump",
        "dump_used": False, "already_rolled_back": [],
        "tables": [{"table": "task_requirements", "rows_removed": 24180, "restored": 24180, "present": 0,
                    "source": "table", "constraint": "task_requirements_task_pk_requirement_id_key",
                    "constraint_dropped": True}],
    }],
    "etl_hosts": [{"host": "lab-etl", "release_before_rollback": "v2", "switched": True, "release_now": "v1",
                   "resumed_lines": ["a"]}],
}


def test_human_sizes():
    assert report.human(None) == "-"
    assert report.human(512) == "512 B"
    assert report.human(526336) == "514.0 KB"
    assert report.human(15099494) == "14.4 MB"
    assert report.human("n/a") == "n/a"


def test_deploy_summary_has_rows_removed_sizes_constraint_seconds_and_backup():
    text = report.dedup_summary(DEPLOY, "reports/lab/20261125T211806Z/report.md")
    lines = text.splitlines()
    assert lines[0] == "deploy run 20261125T211806Z on lab -- reports/lab/20261125T211806Z/report.md"
    assert "lab-db: breezeway at 127.0.0.1:55432 (deploy 20261125T211806Z)" in lines
    assert "  backup: /b/breezeway.dump (514.0 KB, sha256 0268ac099cd1bcc9...)" in lines
    head = next(line for line in lines if line.strip().startswith("table "))
    for col in ("rows before", "rows after", "removed", "dups after", "size before", "size after", "seconds",
                "constraint"):
        assert col in head
    row = next(line for line in lines if line.strip().startswith("task_requirements "))
    assert row.split() == ["task_requirements", "24208", "28", "24180", "0", "3.9", "MB", "64.0", "KB", "0.41",
                           "task_requirements_task_pk_requirement_id_key"]
    assert "  removed 24180 row(s) in 2 table(s), 0.4 s of migration" in lines
    assert "  database size: 14.4 MB -> 13.8 MB" in lines
    assert "ETL lab-etl: release v1 -> v2; smoke test passed; 2 cron line(s) paused during the run" in lines
    # columns line up: every row of the table is as wide as its rule
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "} and line.strip())
    assert lines[rule - 1].index("rows before") < lines[rule + 1].index("24208") + len("24208")


def test_deploy_with_nothing_to_do_and_check_mode():
    data = json.loads(json.dumps(DEPLOY))
    data["check_mode"] = True
    data["databases"][0].update(tables=[], backup=None, database_size_after=None)
    text = report.dedup_summary(data)
    assert "(check mode: nothing was changed)" in text.splitlines()[0]
    assert "nothing to do: no duplicates, every constraint present" in text
    assert "database size" not in text


def test_rollback_summary_and_nothing_left_to_undo():
    text = report.dedup_summary(ROLLBACK, "x/report.md")
    assert text.splitlines()[0] == "rollback run 20261125T211806Z-rollback on lab -- x/report.md"
    assert ("lab-db: breezeway at 127.0.0.1:55432 (deploy 20261125T211806Z rolled back; its status before: "
            "succeeded)") in text
    assert "removed rows read from the backup tables; dump kept: /b/breezeway.dump" in text
    assert "put back 24180 row(s) in 1 table(s)" in text
    assert "ETL lab-etl: current v2 -> v1; 1 cron line(s) resumed" in text
    noop = json.loads(json.dumps(ROLLBACK))
    noop["databases"][0].update(target_deploy=None, tables=[],
                                last_deploy={"run_id": "20261125T211806Z", "status": "rolled_back"})
    noop["etl_hosts"][0].update(switched=False, release_before_rollback="v1", resumed_lines=[])
    text = report.dedup_summary(noop)
    assert "nothing to roll back, the last deploy 20261125T211806Z is already rolled back" in text
    assert "ETL lab-etl: current stays v1; 0 cron line(s) resumed" in text
    noop["databases"][0]["last_deploy"] = None
    assert "nothing to roll back (no deploy in the ledger)" in report.dedup_summary(noop)


def test_rollback_report_without_server_does_not_crash():
    """Reports written before the rollback report had 'server' (the KeyError of show_report.py)."""
    old = json.loads(json.dumps(ROLLBACK))
    del old["databases"][0]["server"]
    assert "lab-db: breezeway (deploy 20261125T211806Z rolled back" in report.dedup_summary(old)


def test_stats_for_awx():
    stats = report.dedup_summary_stats(DEPLOY, "r.md")
    db = stats["databases"][0]
    assert (stats["kind"], stats["report"], db["rows_removed"], db["rows_before"], db["backup"]) == (
        "deploy", "r.md", 24180, 24260, "/b/breezeway.dump")
    assert db["tables"]["task_tags"]["constraint"] == "task_tags_unique"
    assert json.loads(json.dumps(stats)) == stats
    rb = report.dedup_summary_stats(ROLLBACK)["databases"][0]
    assert rb["rows_put_back"] == 24180 and rb["tables"]["task_requirements"]["source"] == "table"


def test_show_report_latest_picks_the_newest_of_either_kind(tmp_path):
    env = tmp_path / "lab"
    (env / "20261125T211806Z").mkdir(parents=True)
    (env / "20261125T211806Z" / "report.json").write_text(json.dumps(DEPLOY))
    rb = env / "20261125T211806Z-rollback" / "20261125T213000Z"
    rb.mkdir(parents=True)
    (rb / "report.json").write_text(json.dumps(ROLLBACK))
    script = REPO / "scripts" / "show_report.py"
    out = subprocess.run([sys.executable, str(script), "--latest", str(env)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rollback run 20261125T211806Z-rollback" in out.stdout
    out = subprocess.run([sys.executable, str(script), str(rb / "report.json")], capture_output=True, text=True)
    assert out.returncode == 0 and "put back 24180 row(s)" in out.stdout, out.stderr
    # a newer deploy wins over the older rollback
    newer = dict(DEPLOY, run_id="20261126T080000Z", finished="2026-11-26T08:01:00Z")
    (env / "20261126T080000Z").mkdir()
    (env / "20261126T080000Z" / "report.json").write_text(json.dumps(newer))
    out = subprocess.run([sys.executable, str(script), "--latest", str(env)], capture_output=True, text=True)
    assert "deploy run 20261126T080000Z on lab" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- the validate role's table summary

BEFORE = {"tables": [{"table": "a", "total_rows": 100, "duplicate_rows": 90},
                     {"table": "b", "total_rows": 10, "duplicate_rows": 0}]}
PLAN = {"tables": [{"table": "a", "size_before": 8192, "existing_constraint": None},
                   {"table": "b", "size_before": 4096, "existing_constraint": {"name": "b_key"}}]}


def test_table_summary_after_a_migration():
    after = {"tables": [{"table": "a", "total_rows": 10, "duplicate_rows": 0},
                        {"table": "b", "total_rows": 10, "duplicate_rows": 0}]}
    after_plan = {"tables": [{"table": "a", "size_before": 1024, "existing_constraint": {"name": "a_key"}},
                             {"table": "b", "size_before": 4096, "existing_constraint": None}]}
    ledger = [{"table_name": "a", "seconds": 1.5, "backup_table": "a__r1"}, {"table_name": "b", "seconds": None}]
    rows = report.dedup_table_summary(BEFORE, PLAN, after, after_plan, ledger, "dedup_rollout", False)
    assert rows[0] == {"table": "a", "rows_before": 100, "rows_after": 10, "removed": 90, "duplicates_after": 0,
                       "size_before": 8192, "size_after": 1024, "seconds": 1.5, "constraint": "a_key",
                       "backup_table": "dedup_rollout.a__r1"}
    # no constraint in the after-plan: the one found before; no seconds recorded: '-'
    assert rows[1]["constraint"] == "b_key" and rows[1]["seconds"] == "-" and rows[1]["backup_table"] is None


def test_table_summary_without_validation_in_check_mode_and_not():
    would = report.dedup_table_summary(BEFORE, PLAN, None, None, [], "s", True)
    assert [(r["rows_after"], r["removed"], r["duplicates_after"]) for r in would] == [(10, "90 (would)", 0),
                                                                                       (10, "0 (would)", 0)]
    assert would[0]["constraint"] == "missing" and would[0]["size_after"] == 8192
    stopped = report.dedup_table_summary(BEFORE, PLAN, None, None, None, "s", False)
    assert [(r["rows_after"], r["removed"], r["duplicates_after"]) for r in stopped] == [(100, 0, 90), (10, 0, 0)]
    assert report.dedup_table_summary({"tables": []}, PLAN) == []
    # check mode with validation's counts of the unchanged tables: still what would be removed
    unchanged = {"tables": [dict(t) for t in BEFORE["tables"]]}
    assert [r["removed"] for r in report.dedup_table_summary(BEFORE, PLAN, unchanged, None, [], "s", True)] == \
        ["90 (would)", "0 (would)"]


# --------------------------------------------------------------------------- report.json's hosts

GROUPS = {"all": ["db1", "etl1", "db2"], "ungrouped": [], "db": ["db1", "db2"], "etl": ["etl1"]}
DEFAULTS = {"dedup_db_name": "breezeway", "dedup_db_host": "127.0.0.1", "dedup_db_port": 5432,
            "dedup_mode": "offline", "dedup_backup_mode": "table"}


def test_report_databases_lists_the_planned_hosts_with_their_outcome():
    hostvars = {
        "db1": {"preflight_plan": {"server": {"database_size": 100}}, "preflight_deploy_id": "r1",
                "preflight_work": True, "validate_after_plan": {"server": {"database_size": 40}},
                "validate_report_tables": [{"table": "a"}], "dedup_db_port": 5433,
                "dedup__recorded": {"changed": True}},
        "db2": {},  # stopped before preflight's plan: not listed
        "etl1": {"inventory_hostname": "etl1", "dedup_etl_ready": True, "dedup_etl_done": True,
                 "etl_deploy_release_dir": "/srv/etl/releases/v2", "etl_deploy_previous_release": "v1",
                 "etl_pause_paused_lines": ["* * * * * etl"]},
    }
    (db,) = report.dedup_report_databases(GROUPS, hostvars, DEFAULTS, False)
    assert db["host"] == "db1" and db["database"] == "breezeway" and db["server"] == "127.0.0.1:5433"
    assert (db["database_size_before"], db["database_size_after"], db["deploy_id"]) == (100, 40, "r1")
    assert db["tables"] == [{"table": "a"}] and db["migration"] == [] and db["backup"] is None
    assert db["region"] == "" and db["mode"] == "offline" and db["backup_mode"] == "table"
    assert db["outcome"] == report.dedup_outcome(
        {"started": True, "work": True, "failure": None, "recorded": {"changed": True}},
        [report.dedup_etl_state(hostvars["etl1"])], False, "offline")
    (etl,) = report.dedup_report_etl(GROUPS, hostvars)
    assert etl == {"host": "etl1", "paused_lines": ["* * * * * etl"], "release_before": "v1", "release_now": "v2",
                   "smoke": None}


def test_report_databases_summarise_the_tables_when_validation_did_not_run():
    """Nothing to do: the validate role is skipped, the report shows the tables as preflight found them."""
    hostvars = {
        "db1": {"preflight_plan": PLAN | {"server": {"database_size": 100}}, "preflight_deploy_id": "r1",
                "preflight_work": False,
                "preflight_before": {"tables": [{"table": "a", "total_rows": 10, "duplicate_rows": 0}]}},
        "db2": {},
        "etl1": {},
    }
    (db,) = report.dedup_report_databases(GROUPS, hostvars, DEFAULTS, False)
    assert db["tables"] == report.dedup_table_summary(hostvars["db1"]["preflight_before"], PLAN)
    assert db["tables"][0]["rows_after"] == 10 and db["tables"][0]["removed"] == 0


def test_rollback_hosts_are_those_that_looked_for_a_deploy():
    hostvars = {
        "db1": {"restore_target": {"run_id": "r1", "status": "succeeded", "dump_path": "/b/x.dump"},
                "restore_run_id": "rb1", "restore_last_deploy": {"run_id": "r1", "status": "succeeded", "x": 1},
                "restore_done": [{"table": "a"}], "restore_needs_dump": False,
                "restore_tables": [{"table_name": "a", "status": "rolled_back"}, {"table_name": "b", "status": "x"}]},
        "db2": {"restore_target": None},
        "etl1": {"rollback_etl_current": "v2", "rollback_etl_switch": "true", "rollback_etl_to": "v1",
                 "etl_resume_restored_lines": ["l"]},
    }
    dbs = report.dedup_rollback_databases(GROUPS, hostvars, DEFAULTS)
    assert [d["host"] for d in dbs] == ["db1", "db2"]
    assert dbs[0]["last_deploy"] == {"run_id": "r1", "status": "succeeded"} and dbs[0]["target_deploy"] == "r1"
    assert dbs[0]["already_rolled_back"] == ["a"] and dbs[0]["dump"] == "/b/x.dump"
    assert dbs[1]["target_deploy"] is None and dbs[1]["last_deploy"] is None and dbs[1]["tables"] == []
    assert report.dedup_rollback_etl(GROUPS, hostvars) == [
        {"host": "etl1", "region": "", "release_before_rollback": "v2", "switched": True, "release_now": "v1",
         "resumed_lines": ["l"]}]
    assert report.dedup_rollback_etl(GROUPS, {"etl1": {}}) == []
