"""Selecting runbook steps with --tags / --skip-tags (issue 18), on the lab through the real deploy_dedup.yml.

Every step has its role's name as a tag; the settings and preflight always run; unsafe selections are refused
before anything changes, with the reason.
"""

from __future__ import annotations

import re
import subprocess

from test_deploy import assert_nothing_changed, unique_constraints

from harness import REPO, VENV_BIN, ansible_env

DEPLOY = REPO / "deploy_dedup.yml"
ROLLBACK = REPO / "rollback.yml"
STEPS = ["preflight", "etl_pause", "backup", "migrate", "validate", "etl_deploy", "etl_smoke", "etl_resume", "report"]


def role_tasks(output: str) -> set[str]:
    """The roles whose tasks ran (TASK [role : name] lines; ansible's own argument spec check is tagged always)."""
    return set(re.findall(r"^TASK \[(\w+) : (?!Validating arguments against arg spec)", output, re.M))


def test_every_step_is_listed_as_a_tag():
    for playbook, steps in ((DEPLOY, STEPS), (ROLLBACK, ["etl_pause", "restore", "rollback_etl", "etl_resume",
                                                           "rollback_report"])):
        out = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(playbook), "--list-tags"], cwd=REPO,
                             env=ansible_env(), capture_output=True, text=True, check=True).stdout
        listed = {t.strip() for m in re.finditer(r"TASK TAGS: \[([^\]]*)\]", out) for t in m.group(1).split(",")}
        assert set(steps) <= listed, (playbook.name, sorted(listed))


def test_tags_preflight_runs_only_preflight_and_changes_nothing(lab):
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    res = lab.playbook(DEPLOY, "--tags", "preflight")
    assert res.rc == 0, res.output[-4000:]
    assert res.changed() == 0, res.output[-4000:]
    ran = role_tasks(res.stdout)
    assert "preflight" in ran and not ran & {"etl_pause", "backup", "migrate", "validate", "etl_deploy", "etl_smoke",
                                               "etl_resume", "report"}, ran
    assert_nothing_changed(lab, counts, cron, cons)
    assert lab.current_release().endswith("v1")


def test_skip_tags_etl_smoke_deploys_without_the_smoke_run(lab):
    cron = lab.crontab()
    res = lab.playbook(DEPLOY, "--skip-tags", "etl_smoke")
    assert res.rc == 0, res.output[-5000:]
    ran = role_tasks(res.stdout)
    assert "etl_smoke" not in ran and {"backup", "migrate", "validate", "etl_deploy", "etl_resume"} <= ran, ran
    assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
    assert lab.current_release().endswith("v2")
    assert lab.crontab() == cron, "the ETL cron is not back as it was"


def test_unsafe_selections_are_refused_with_a_reason_before_anything_changes(lab):
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    # dump mode without the dump: refused after preflight (a resumed deploy's recorded dump would do), ETL untouched
    res = lab.playbook(DEPLOY, "--skip-tags", "backup", extra_vars={"dedup_backup_mode": "dump"})
    out = " ".join(res.output.split())
    assert res.rc != 0 and "with the backup step skipped" in out and "dedup_backup_mode=table" in out, out[-3000:]
    assert "etl_pause" not in role_tasks(res.stdout)
    assert_nothing_changed(lab, counts, cron, cons)
    # offline migration with the ETL running, and preflight itself: refused in the first play
    for args, reason in ((["--skip-tags", "etl_pause"], "migrate without etl_pause in offline mode"),
                         (["--skip-tags", "preflight"], "preflight cannot be skipped"),
                         (["--tags", "migrate"], "migrate without validate")):
        res = lab.playbook(DEPLOY, *args)
        out = " ".join(res.output.split())
        assert res.rc != 0 and reason in out and "Nothing was changed" in out, (args, out[-3000:])
        assert "preflight" not in role_tasks(res.stdout), args
    assert_nothing_changed(lab, counts, cron, cons)


ROLLBACK_STEPS = {"etl_pause", "restore", "rollback_etl", "etl_resume", "rollback_report", "monitor"}


def deploy_status(lab) -> dict[str, str]:
    return dict(lab.query("SELECT run_id, status FROM dedup_rollout.runs"))


def test_rollback_unsafe_selections_are_refused_before_anything_changes_and_a_safe_one_runs(lab):
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-5000:]
    (deploy_id,) = [r for r, s in deploy_status(lab).items() if s == "succeeded"]
    counts, cron, cons, ledger = lab.counts(), lab.crontab(), unique_constraints(lab), deploy_status(lab)
    assert lab.current_release().endswith("v2")
    # refused in the first play (the plan skipped: by every later play's guard), before any step's task runs
    for args, reason in ((["--tags", "restore"], "restore without etl_pause"),
                         (["--skip-tags", "rollback_etl"], "restore without rollback_etl"),
                         (["--skip-tags", "etl_resume"], "etl_pause without etl_resume"),
                         (["--tags", "rollback_etl,etl_resume"], "rollback_etl without etl_pause"),
                         (["--tags", "rollback_report"], "rollback_report without restore"),
                         (["--skip-tags", "always"], "the plan cannot be skipped")):
        res = lab.playbook(ROLLBACK, *args)
        out = " ".join(res.output.split())
        assert res.rc != 0 and reason in out and "Nothing was changed" in out, (args, out[-3000:])
        assert "Selecting steps" in out, args
        assert not role_tasks(res.stdout) & ROLLBACK_STEPS, (args, role_tasks(res.stdout))
        assert (lab.counts(), lab.crontab(), unique_constraints(lab)) == (counts, cron, cons), args
        assert deploy_status(lab) == ledger and lab.current_release().endswith("v2"), args

    # safe: everything but the record; the rows are back, the release and the cron as before the deploy
    res = lab.playbook(ROLLBACK, "--skip-tags", "rollback_report")
    assert res.rc == 0, res.output[-5000:]
    ran = role_tasks(res.stdout)
    assert {"etl_pause", "restore", "rollback_etl", "etl_resume"} <= ran, ran
    assert not ran & {"rollback_report", "monitor"}, ran
    assert any(v > 0 for v in lab.duplicates().values()), "the removed rows are not back"
    assert lab.counts() != counts and lab.current_release().endswith("v1") and lab.crontab() == cron
    assert deploy_status(lab)[deploy_id] == "succeeded", "recorded although rollback_report was skipped"
    # ... and the next full run records it, with nothing left to put back
    res = lab.playbook(ROLLBACK)
    assert res.rc == 0, res.output[-5000:]
    assert deploy_status(lab)[deploy_id] == "rolled_back" and deploy_status(lab)[deploy_id + "-rollback"] == "succeeded"
    assert lab.current_release().endswith("v1") and lab.crontab() == cron
