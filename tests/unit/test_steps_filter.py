"""plugins/filter/steps.py: which steps --tags/--skip-tags select and which selections the playbooks refuse."""

from __future__ import annotations

from _load import by_path

steps = by_path("plugins/filter/steps.py", "dedup_steps_filter")
DEPLOY = ["etl_pause", "backup", "migrate", "validate", "etl_deploy", "etl_smoke", "etl_resume", "report"]
ROLLBACK = ["etl_pause", "restore", "rollback_etl", "etl_resume", "rollback_report"]


def test_selected_steps_follow_tags_and_skip_tags():
    assert steps.dedup_selected_steps(DEPLOY, ["all"], []) == DEPLOY
    assert steps.dedup_selected_steps(DEPLOY, ["tagged"], ["report"]) == DEPLOY[:-1]
    assert steps.dedup_selected_steps(DEPLOY, ["migrate", "validate"], []) == ["migrate", "validate"]
    assert steps.dedup_selected_steps(DEPLOY, ["all"], ["etl_pause", "etl_resume"]) == \
        ["backup", "migrate", "validate", "etl_deploy", "etl_smoke", "report"]
    assert steps.dedup_selected_steps(None, None, None) == []


def test_deploy_refusals():
    full = steps.dedup_selected_steps(DEPLOY, ["all"], [])
    assert steps.dedup_deploy_step_problems(full, [], True, "offline") == ""
    assert steps.dedup_deploy_step_problems(full, ["always"], True, "offline").startswith(
        "preflight cannot be skipped")
    only_migrate = ["migrate"]
    problems = steps.dedup_deploy_step_problems(only_migrate, [], True, "offline").split("; ")
    assert [p.split(":")[0] for p in problems] == ["migrate without validate",
                                                   "migrate without etl_pause in offline mode"]
    assert steps.dedup_deploy_step_problems(["migrate", "validate"], [], True, "online") == ""
    assert steps.dedup_deploy_step_problems(["migrate", "validate"], [], False, "offline") == "", "no ETL host"
    assert steps.dedup_deploy_step_problems(["etl_pause"], [], "True", "offline").startswith(
        "etl_pause without etl_resume")


def test_rollback_refusals():
    full = steps.dedup_selected_steps(ROLLBACK, ["all"], [])
    assert steps.dedup_rollback_step_problems(full, True) == ""
    found = steps.dedup_rollback_step_problems(["restore"], True).split("; ")
    assert [p.split(":")[0] for p in found] == ["restore without etl_pause", "restore without rollback_etl"]
    assert steps.dedup_rollback_step_problems(["rollback_etl", "etl_resume"], True).startswith(
        "rollback_etl without etl_pause")
    assert steps.dedup_rollback_step_problems(["rollback_report"], False).startswith("rollback_report without restore")
    assert steps.dedup_rollback_step_problems(["restore", "rollback_report"], False) == "", "no ETL host"
    assert steps.dedup_rollback_step_problems(["etl_pause", "restore", "rollback_etl"], True).startswith(
        "etl_pause without etl_resume")
