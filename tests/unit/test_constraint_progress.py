"""plugins/action/pg_unique_constraint.py: whether the constraint step runs in the background with progress lines
(pure: the plan's sizes and the migration's results as task variables, no module run)."""

from __future__ import annotations

from _load import by_path

action = by_path("plugins/action/pg_unique_constraint.py", "pg_unique_constraint_action")


class Templar:
    def template(self, value):
        return value


def plan(task_vars, args=None):
    act = object.__new__(action.ActionModule)
    act._templar = Templar()
    args = args or {"constraints": [{"schema": "s", "table": "big"}, {"schema": "s", "table": "small"}]}
    return act.progress_plan(args, task_vars)


GB, MB = 1 << 30, 1 << 20
PLAN = {"tables": [{"schema": "s", "table": "big", "heap_size": 2 * GB},
                   {"schema": "s", "table": "small", "heap_size": 5 * MB}]}


def test_a_big_table_in_the_plan_means_background():
    out = plan({"preflight_plan": PLAN})
    assert out is not None and out["reader"] == {"kind": "index", "tables": [["s", "big"], ["s", "small"]]}


def test_the_size_after_this_runs_deduplication_counts_not_the_plans():
    applied = {"results": [{"schema": "s", "table": "big", "changed": True, "size_after": 40 * MB}]}
    assert plan({"preflight_plan": PLAN, "migrate__applied": applied}) is None
    # still big after it: background
    applied["results"][0]["size_after"] = 1536 * MB
    assert plan({"preflight_plan": PLAN, "migrate__applied": applied}) is not None
    # a table left as it was (no duplicates) keeps the plan's size
    applied["results"][0].update(changed=False, size_after=1)
    assert plan({"preflight_plan": PLAN, "migrate__applied": applied}) is not None


def test_unknown_size_is_long_and_absent_is_never():
    assert plan({"preflight_plan": {"tables": []}}) is not None
    assert plan({"preflight_plan": PLAN}, {"state": "absent", "table": "big", "schema": "s"}) is None
