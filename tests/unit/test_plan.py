"""module_utils/dedup_plan.py: step splitting, step markers, backup table names (pure, no cluster)."""

from __future__ import annotations

from _load import REPO, module_util

plan = module_util("dedup_plan")

RENDERED = """-- header comment, before any step: dropped
BEGIN;
-- @step settings
SET LOCAL lock_timeout = '5s';
-- @step lock
LOCK TABLE "s"."t" IN ACCESS EXCLUSIVE MODE;
-- @step empty
-- @step keep
CREATE TEMP TABLE keep AS
SELECT 1;
COMMIT;
"""


def test_split_steps_names_bodies_and_drops_begin_commit():
    steps = plan.split_steps(RENDERED)
    assert [name for name, _ in steps] == ["settings", "lock", "keep"]  # a step with no SQL is left out
    assert steps[0][1] == "SET LOCAL lock_timeout = '5s';"
    assert steps[2][1] == "CREATE TEMP TABLE keep AS\nSELECT 1;"
    assert all("BEGIN" not in body and "COMMIT" not in body for _, body in steps)


def test_split_steps_without_markers_is_empty():
    assert plan.split_steps("SELECT 1;") == []
    assert plan.split_steps("-- @step Bad-Name\nSELECT 1;") == []  # names are [a-z_]+


def test_every_step_of_the_template_has_a_progress_text():
    names = set(plan.STEP_RE.findall((REPO / "sql" / "migrate_table.sql.j2").read_text()
                                     + (REPO / "sql" / "ledger_table_run.sql.j2").read_text()))
    assert names, "no -- @step line found in sql/migrate_table.sql.j2"
    assert names <= set(plan.STEP_TEXT), names - set(plan.STEP_TEXT)


def test_marker_round_trip():
    mark = plan.step_marker("20261130T100720Z", "breezeway", "task_tags", "keep", 4, 12, 2)
    assert mark.startswith(plan.MARKER_PREFIX) and mark.endswith(" */\n")
    assert plan.parse_marker(mark + "SELECT 1") == {
        "run": "20261130T100720Z", "schema": "breezeway", "table": "task_tags", "step": "keep",
        "n": 4, "of": 12, "attempt": 2}


def test_marker_with_hostile_names_cannot_end_the_comment_early():
    table = 'x*/; DROP TABLE t; /*"'
    mark = plan.step_marker("r", "s */", table, "lock", 1, 2, 1)
    body = mark[len(plan.MARKER_PREFIX):-len(" */\n")]
    assert "*/" not in body
    data = plan.parse_marker(mark)
    assert data["table"] == table and data["schema"] == "s */"


def test_parse_marker_refuses_what_is_not_a_marker():
    assert plan.parse_marker(None) is None
    assert plan.parse_marker("") is None
    assert plan.parse_marker("SELECT 1") is None
    assert plan.parse_marker(plan.MARKER_PREFIX + "{not json} */") is None
    assert plan.parse_marker(plan.MARKER_PREFIX + "[1, 2] */") is None  # JSON, but not an object
    assert plan.parse_marker(plan.MARKER_PREFIX + '{"run": "r"') is None  # never closed


def test_backup_table_name_short_is_table_and_run_id():
    assert plan.backup_table_name("task_tags", "20261130T100720Z") == "task_tags__20261130T100720Z"


def test_backup_table_name_long_fits_63_bytes_keeps_run_id_and_differs_per_table():
    run_id = "20261130T100720Z"
    a = plan.backup_table_name("a" * 60, run_id)
    b = plan.backup_table_name("a" * 59 + "b", run_id)
    for name in (a, b):
        assert len(name.encode()) <= 63
        assert name.endswith("__" + run_id)
    assert a != b
    assert a == plan.backup_table_name("a" * 60, run_id)  # stable


def test_backup_table_name_never_cuts_a_multibyte_character():
    name = plan.backup_table_name("é" * 40, "20261130T100720Z")
    assert len(name.encode("utf-8")) <= 63
    name.encode("utf-8").decode("utf-8")  # valid UTF-8
    assert name.startswith("é")
