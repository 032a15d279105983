"""roles/dedup_common/filter_plugins/dedup_settings.py: the settings checks the first play runs (pure)."""

from __future__ import annotations

from _load import by_path

settings = by_path("roles/dedup_common/filter_plugins/dedup_settings.py", "dedup_settings_filter")

GOOD = {
    "dedup_db_port": 5432, "dedup_db_connect_timeout": 10, "dedup_wait_idle_retries": 3,
    "dedup_db_host": "127.0.0.1", "dedup_db_name": "breezeway", "dedup_db_user": "dedup",
    "dedup_etl_user": "dedup_etl", "dedup_env_name": "lab", "dedup_schema": "breezeway",
    "dedup_backup_schema": "dedup_backup", "dedup_backup_dir": "/var/backups/dedup", "dedup_etl_dir": "/opt/etl",
    "dedup_run_id": "20261130T100720Z", "dedup_now": "", "dedup_etl_cron_pattern": "etl\\.py",
    "dedup_etl_process_pattern": "etl\\.py", "dedup_ignore_columns": ["id", "created_at"],
    "dedup_tables": [{"name": "task_tags", "natural_key": ["task_pk", "tag_id"]},
                     {"name": "task_photos", "natural_key": ["task_pk", "photo_id"], "order_by": "created_at"}],
}


def problems(**changes):
    return settings.dedup_settings_problems({**GOOD, **changes})


def test_good_settings_have_no_problem():
    assert problems() == []


def test_every_problem_is_named_at_once():
    found = problems(dedup_db_port=0, dedup_schema="s" * 64, dedup_backup_dir="relative",
                     dedup_run_id="-bad", dedup_etl_cron_pattern="(")
    assert len(found) == 5
    assert any(p.startswith("dedup_db_port must be a port number") for p in found)
    assert any("longer than PostgreSQL's 63-byte limit" in p for p in found)
    assert any(p.startswith("dedup_backup_dir must be an absolute path") for p in found)
    assert any(p.startswith("dedup_run_id must be letters") for p in found)
    assert any("is not a valid regular expression" in p for p in found)


def test_tables_named_by_index_and_name():
    found = problems(dedup_tables=[{"name": "t", "natural_key": ["a", "a"]}, {"name": "t", "natural_key": []}])
    assert "dedup_tables[0] (t).natural_key ['a', 'a'] names a column twice" in found
    assert any(p.startswith("dedup_tables[1] (t): table 't' is listed twice") for p in found)
    assert any(p.startswith("dedup_tables[1] (t).natural_key must be a non-empty list") for p in found)
    assert problems(dedup_tables=[]) == ["dedup_tables must list at least one table with its natural key"]


def test_schemas_apart_and_now_iso():
    assert any("must differ from dedup_schema" in p for p in problems(dedup_backup_schema="breezeway"))
    assert problems(dedup_now="2025-12-10T06:00:00Z") == []
    assert any(p.startswith("dedup_now must be empty or an ISO 8601") for p in problems(dedup_now="yesterday"))


def test_spec_options_merges_entry_points_without_defaults():
    spec = {"argument_specs": {
        "main": {"options": {"a": {"type": "str", "default": "x"}, "b": {"type": "int"}}},
        "settings": {"options": {"b": {"type": "str", "default": "{{ y }}"},
                                 "t": {"type": "list", "options": {"k": {"type": "str", "default": "z"}}}}},
    }}
    assert settings.dedup_spec_options(spec) == {
        "a": {"type": "str"}, "b": {"type": "str"}, "t": {"type": "list", "options": {"k": {"type": "str"}}}}
    assert settings.dedup_spec_options(None) == {}


def test_spec_options_of_a_role_leave_out_the_facts_it_takes_from_another_role():
    spec = {"argument_specs": {"main": {"options": {
        "migrate_retries": {"type": "int", "default": 5}, "dedup_tables": {"type": "list"},
        "preflight_plan": {"type": "dict", "required": True}}}}}
    assert settings.dedup_spec_options(spec, "migrate") == {"migrate_retries": {"type": "int"},
                                                            "dedup_tables": {"type": "list"}}
