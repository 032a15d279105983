"""Which runbook steps a run selects (--tags / --skip-tags) and which selections are refused, for deploy_dedup.yml
and rollback.yml. Pure Python (tests/unit/test_steps_filter.py).

    {{ DEPLOY_STEPS | dedup_selected_steps(ansible_run_tags, ansible_skip_tags) }}
    {{ deploy_selected_steps | dedup_deploy_step_problems(ansible_skip_tags, has_etl, dedup_mode) }}
    {{ rollback_selected_steps | dedup_rollback_step_problems(has_etl) }}

A problem is one sentence naming the two steps and what would go wrong; the filters join them with '; ' ('' when
the selection is safe), for the playbooks' "Refuse a step selection that is not safe" asserts.
"""

from __future__ import annotations


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("yes", "true", "1", "on", "y")
    return bool(value)


def dedup_selected_steps(steps, run_tags, skip_tags) -> list:
    """The steps (tags) of ``steps`` that run: selected by --tags (or no --tags: 'all'; or 'tagged') and not skipped."""
    run, skip = set(run_tags or []), set(skip_tags or [])
    return [s for s in steps or [] if ("all" in run or "tagged" in run or s in run) and s not in skip]


def dedup_deploy_step_problems(selected, skip_tags, has_etl, mode) -> str:
    """Why deploy_dedup.yml refuses this selection ('' when it does not)."""
    sel, skip, etl = set(selected or []), set(skip_tags or []), _truthy(has_etl)
    out = []
    if "preflight" in skip or "always" in skip:
        out.append("preflight cannot be skipped: it takes the run lock and plans what every later step does")
    if "migrate" in sel and "validate" not in sel:
        out.append("migrate without validate: the deploy would be recorded without checking its result")
    if etl and mode == "offline" and "migrate" in sel and "etl_pause" not in sel:
        out.append("migrate without etl_pause in offline mode: the ETL would write while the tables are rewritten "
                   "(select etl_pause too, or use dedup_mode=online)")
    if etl and "etl_pause" in sel and "etl_resume" not in sel:
        out.append("etl_pause without etl_resume: the ETL cron would stay paused after the run")
    return "; ".join(out)


def dedup_rollback_step_problems(selected, has_etl) -> str:
    """Why rollback.yml refuses this selection ('' when it does not)."""
    sel, etl = set(selected or []), _truthy(has_etl)
    out = []
    if etl and "restore" in sel and "etl_pause" not in sel:
        out.append("restore without etl_pause: the ETL would write while constraints are dropped and rows are put "
                   "back")
    if etl and "rollback_etl" in sel and "etl_pause" not in sel:
        out.append("rollback_etl without etl_pause: current would be switched under a running ETL")
    if etl and "etl_pause" in sel and "etl_resume" not in sel:
        out.append("etl_pause without etl_resume: the ETL cron would stay paused after the run")
    if etl and "restore" in sel and "rollback_etl" not in sel:
        out.append("restore without rollback_etl: the constraints would be dropped while the fixed release stays "
                   "current, and its upsert (ON CONFLICT on the natural key) needs them: every ETL run would fail")
    if "rollback_report" in sel and "restore" not in sel:
        out.append("rollback_report without restore: the deploy would be recorded as rolled back with its removed "
                   "rows not put back, and a plain re-run would then find nothing to roll back")
    return "; ".join(out)


class FilterModule:
    def filters(self):
        return {"dedup_selected_steps": dedup_selected_steps,
                "dedup_deploy_step_problems": dedup_deploy_step_problems,
                "dedup_rollback_step_problems": dedup_rollback_step_problems}
