"""roles/monitor/filter_plugins/monitor.py: what one monitoring check found, the scheduled check's tables (pure)."""

from __future__ import annotations

import json

import pytest
from _load import by_path

monitor = by_path("roles/monitor/filter_plugins/monitor.py", "dedup_monitor_filter")


def dup(table, rows=0, groups=0, key=("k",), **extra):
    return {"table": table, "schema": "s", "natural_key": list(key), "total_rows": 10, "duplicate_rows": rows,
            "duplicate_groups": groups, "sample_duplicate_keys": [], **extra}


def con(table, action="none", valid=True):
    return {"item": {"name": table}, "name": f"{table}_k_key", "action": action,
            "existing": {"valid": valid} if action != "created" else None}


def sizes(*tables):
    return {"tables": [{"table": t, "bytes": 8192 * (i + 1)} for i, t in enumerate(tables)],
            "database_size": 1000, "backup_schema_bytes": 50}


def test_clean_check():
    out = monitor.monitor_findings([dup("a", key=("k1", "k2"))], [con("a")], sizes("a"), [])
    assert out == {
        "clean": True, "problems": [], "duplicate_rows": 0, "missing_constraints": [],
        "database_size": 1000, "backup_schema_bytes": 50, "etl": [],
        "tables": [{"table": "a", "schema": "s", "natural_key": ["k1", "k2"], "total_rows": 10,
                    "duplicate_rows": 0, "duplicate_groups": 0, "sample_duplicate_keys": [],
                    "constraint": "a_k_key", "constraint_present": True, "constraint_valid": True,
                    "constraint_action": "none", "bytes": 8192}],
    }
    # The order of the keys is the order of the deploy's monitor.jsonl lines.
    assert list(out) == ["clean", "problems", "duplicate_rows", "missing_constraints", "database_size",
                         "backup_schema_bytes", "tables", "etl"]


def test_duplicates_and_missing_constraints_are_named_per_table():
    dups = [dup("a", 4, 2, sample_duplicate_keys=[[1, "x"], [2, "é"]]), dup("b", "3", 1), dup("c")]
    del dups[1]["sample_duplicate_keys"]
    cons = [con("c", "created"), con("b", "rebuilt_invalid_index", valid=False), con("a")]
    out = monitor.monitor_findings(dups, cons, sizes("c", "b", "a"), None)
    assert out["problems"] == [
        's.a: 4 duplicate rows in 2 keys (sample [[1, "x"], [2, "\\u00e9"]])',
        "s.b: 3 duplicate rows in 1 keys (sample [])",
        "s.b: no valid UNIQUE constraint on (k) (expected b_k_key; only an INVALID index left by a failed build)",
        "s.c: no valid UNIQUE constraint on (k) (expected c_k_key; none found)",
    ]
    assert out["clean"] is False
    assert out["duplicate_rows"] == 7  # "3" counted as a number
    assert out["missing_constraints"] == ["b", "c"]
    assert [t["bytes"] for t in out["tables"]] == [24576, 16384, 8192]  # sizes matched by name, not position
    assert [t["constraint_valid"] for t in out["tables"]] == [True, False, False]
    assert out["tables"][1]["sample_duplicate_keys"] == []


def test_etl_problems_follow_the_tables():
    etl = [{"host": "e1", "problems": []}, {"host": "e2", "problems": ["e2: 1 ETL cron line(s) still paused"]}]
    out = monitor.monitor_findings([dup("a", 2, 1)], [con("a")], sizes("a"), etl)
    assert out["problems"][1:] == ["e2: 1 ETL cron line(s) still paused"]
    assert out["etl"] == etl
    only_etl = monitor.monitor_findings([], [], sizes(), etl)
    assert only_etl["clean"] is False and only_etl["tables"] == [] and only_etl["duplicate_rows"] == 0


def test_a_table_without_its_constraint_check_is_an_error():
    with pytest.raises(ValueError, match="no constraint check for table 'a'"):
        monitor.monitor_findings([dup("a")], [con("b")], sizes("a"), [])


def test_result_is_json_as_recorded():
    out = monitor.monitor_findings([dup("a", 2, 1)], [con("a", "created")], sizes("a"), [])
    assert json.loads(json.dumps(out)) == out


def test_schedule_tables_take_the_constraint_the_ledger_recorded():
    tables = [{"name": "a", "natural_key": ["x", "y"]}, {"name": "b", "natural_key": ["z"], "order_by": "id"},
              {"name": "c", "natural_key": ["w"]}]
    ledger = [{"table_name": "a", "constraint_name": "a_x_y_key"}, {"table_name": "b", "constraint_name": None},
              {"table_name": "a", "constraint_name": "later"}]
    assert monitor.monitor_schedule_tables(tables, ledger) == [
        {"name": "a", "natural_key": ["x", "y"], "constraint": "a_x_y_key"},
        {"name": "b", "natural_key": ["z"], "constraint": ""},
        {"name": "c", "natural_key": ["w"], "constraint": ""},
    ]
    assert monitor.monitor_schedule_tables(tables[:1], []) == [{"name": "a", "natural_key": ["x", "y"],
                                                                "constraint": ""}]


def test_filters_are_registered():
    assert set(monitor.FilterModule().filters()) == {"monitor_findings", "monitor_schedule_tables",
                                                     "monitor_constraint_checks"}


def test_list_mode_results_name_their_table_and_the_checks_are_built_from_dedup_tables():
    listed = [{"table": "a", "schema": "s", "name": "a_k_key", "action": "none", "existing": {"valid": True}}]
    out = monitor.monitor_findings([dup("a")], listed, sizes("a"), [])
    assert out["clean"] and out["tables"][0]["constraint"] == "a_k_key"
    assert monitor.monitor_constraint_checks([{"name": "a", "natural_key": ("x", "y"), "keep": "oldest"}], "s") == \
        [{"schema": "s", "table": "a", "columns": ["x", "y"]}]
