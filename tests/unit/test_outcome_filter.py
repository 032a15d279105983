"""plugins/filter/report.py: a region's outcome from its hosts' facts, and how the summary shows it (pure)."""

from __future__ import annotations

from _load import by_path

report = by_path("plugins/filter/report.py", "dedup_report_filter_outcome")
outcome = report.dedup_outcome

ETL_OK = [{"host": "etl-a", "ready": True, "done": True, "failure": None}]


def test_a_recorded_deploy_succeeded_and_its_cron_is_resumed():
    got = outcome({"started": True, "work": True, "recorded": {"changed": True}}, ETL_OK)
    assert got == {"status": "succeeded", "step": None, "error": None, "etl": "resumed"}


def test_a_database_failure_before_any_change_resumes_the_cron():
    fail = {"step": "Migrate task_tags", "error": "lock timeout", "changed_tables": []}
    got = outcome({"started": True, "work": True, "failure": fail}, ETL_OK)
    assert (got["status"], got["step"], got["etl"]) == ("failed", "Migrate task_tags", "resumed")


def test_a_partly_migrated_database_leaves_the_cron_paused():
    fail = {"step": "x", "error": "boom", "changed_tables": ["task_tags"]}
    got = outcome({"started": True, "work": True, "failure": fail}, ETL_OK)
    assert got["etl"] == "paused" and got["changed_tables"] == ["task_tags"]
    text = "\n".join(report._deploy_lines({"host": "db", "outcome": got, "tables": []}))
    assert "outcome: FAILED at x; ETL cron paused" in text and "changed before the failure: task_tags" in text


def test_a_failed_pause_is_named():
    fail = {"step": "Check that this region's ETL is paused", "error": "pause failed", "changed_tables": []}
    etl = [{"host": "etl-c", "ready": False, "done": False, "failure": None}]
    assert outcome({"started": True, "work": True, "failure": fail}, etl)["etl"].startswith("paused on etl-c")


def test_a_failed_smoke_test_fails_the_region_with_the_cron_paused():
    etl = [{"host": "etl-b", "ready": True, "done": False, "failure": "smoke: duplicates"}]
    got = outcome({"started": True, "work": True, "recorded": {"skipped": True}}, etl)
    assert got["status"] == "failed" and "etl-b" in got["step"] and got["etl"] == "paused"


def test_online_mode_never_touches_the_cron_and_other_states():
    assert outcome({"started": True, "work": True, "recorded": {"changed": True}}, ETL_OK,
                   mode="online")["etl"] == "untouched"
    assert outcome({"started": False}, ETL_OK)["status"] == "not started"
    assert outcome({"started": True, "work": False}, ETL_OK)["status"] == "nothing to do"
    assert outcome({"started": True, "work": True}, ETL_OK, check_mode=True)["status"] == "checked"
    assert outcome({"started": True, "work": True, "recorded": {"skipped": True}}, [])["status"] == "unfinished"


def test_the_summary_lists_every_region():
    dbs = [{"host": f"db-{r}", "database": "d", "region": r, "deploy_id": "1", "tables": [],
            "outcome": {"status": st, "step": "s" if st == "failed" else None, "error": "e" if st == "failed" else None,
                        "etl": "paused" if st == "failed" else "resumed"}}
           for r, st in (("r1", "succeeded"), ("r2", "failed"), ("r3", "succeeded"))]
    text = report.dedup_summary({"kind": "deploy", "run_id": "1", "environment": "x", "databases": dbs})
    assert "region r2: db-r2" in text and "outcome: FAILED at s; ETL cron paused" in text
    assert "regions: r1 succeeded; r2 failed; r3 succeeded" in text
    stats = report.dedup_summary_stats({"kind": "deploy", "databases": dbs})
    assert [d["outcome"] for d in stats["databases"]] == ["succeeded", "failed", "succeeded"]


def test_the_rollback_summary_names_the_region():
    db = {"host": "db-a", "database": "d", "region": "austin", "target_deploy": "r1", "tables": []}
    text = report.dedup_summary({"kind": "rollback", "run_id": "2", "environment": "x", "databases": [db]})
    assert "region austin: db-a: d (deploy r1 rolled back" in text
