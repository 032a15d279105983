"""Settings are validated in the first play (roles/dedup_common: argument spec + tasks/settings.yml).

The first tests are pure (no cluster): every role's argument spec declares the defaults of its defaults/main.yml,
dedup_common's spec covers its whole interface, and the settings filter names what is wrong. The last ones run the
real deploy_dedup.yml / rollback.yml on one lab with one bad value each: the run fails in the first play, naming
the setting, and nothing changed (crontab, row counts, no ledger, ETL release).
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from harness import REPO

ROLES = REPO / "roles"
DEPLOY = REPO / "deploy_dedup.yml"
ROLLBACK = REPO / "rollback.yml"
FIRST_PLAY = "PLAY [Check every setting and fix one run id for the whole run]"


def _load_filter():
    path = ROLES / "dedup_common" / "filter_plugins" / "dedup_settings.py"
    spec = importlib.util.spec_from_file_location("dedup_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


settings_filter = _load_filter()


def _yaml(path):
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def common_defaults() -> dict:
    return _yaml(ROLES / "dedup_common" / "defaults" / "main.yml")


# --------------------------------------------------------------------------- pure


SPEC_ROLES = sorted(p.name for p in ROLES.iterdir() if (p / "meta" / "argument_specs.yml").exists())


@pytest.mark.parametrize("role", SPEC_ROLES)
def test_argument_spec_declares_the_defaults_of_defaults_main(role):
    """Every variable of defaults/main.yml has an option with the same default in every entry point naming it;
    every dedup_* option a role repeats carries dedup_common's default (unless required)."""
    defaults = _yaml(ROLES / role / "defaults" / "main.yml")
    common = common_defaults()
    specs = _yaml(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    declared = {}
    for entry, spec in specs.items():
        for name, attrs in (spec.get("options") or {}).items():
            declared.setdefault(name, []).append((entry, attrs))
    missing = sorted(set(defaults) - set(declared))
    assert not missing, f"{role}: defaults/main.yml variables without an option: {missing}"
    wrong = []
    for name, entries in declared.items():
        want = defaults[name] if name in defaults else common.get(name, None)
        if name not in defaults and name not in common:
            continue
        for entry, attrs in entries:
            if attrs.get("required"):
                assert "default" not in attrs, f"{role}/{entry}/{name}: required with a default"
                continue
            if "default" not in attrs or attrs["default"] != want:
                wrong.append(f"{entry}/{name}: spec {attrs.get('default', '<none>')!r} != defaults {want!r}")
    assert not wrong, f"{role}: " + "; ".join(wrong)


def test_dedup_common_spec_covers_the_whole_interface_with_suboptions():
    spec = _yaml(ROLES / "dedup_common" / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = common_defaults()
    assert set(defaults) - {"dedup_common_settings_roles"} == set(spec)
    tables = spec["dedup_tables"]
    assert set(tables["options"]) == {"name", "natural_key", "keep", "order_by"}
    assert tables["options"]["keep"]["choices"] == ["oldest", "newest"]
    assert spec["dedup_mode"]["choices"] == ["offline", "online"]
    assert spec["dedup_backup_mode"]["choices"] == ["table", "dump"]
    assert spec["dedup_db_password"]["no_log"] is True


def test_validator_rejects_unknown_dedup_tables_keys_and_names_them():
    """Ansible's own role argument validation rejects a suboption it does not know and names it."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    spec = _yaml(ROLES / "dedup_common" / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    tables = [{"name": "a", "natural_key": ["x"], "kep": "newest"}, {"name": "b", "natural_kye": ["x"]}]
    res = ArgumentSpecValidator({"dedup_tables": spec["dedup_tables"]}).validate(
        {"dedup_tables": tables}, validate_role_argument_spec=True)
    text = " | ".join(res.error_messages)
    assert "dedup_tables.kep" in text and "dedup_tables.natural_kye" in text, text
    assert "missing required arguments: natural_key found in dedup_tables" in text, text


def good_settings(**over) -> dict:
    s = dict(common_defaults())
    s.update(dedup_db_password="x", dedup_env_name="lab", dedup_run_id="20261125T211806Z")
    s.update(over)
    return s


def test_settings_filter_accepts_the_defaults_and_names_each_problem():
    assert settings_filter.dedup_settings_problems(good_settings()) == []
    cases = {
        "dedup_db_port": ({"dedup_db_port": 70000}, "dedup_db_port must be a port number"),
        "timeout": ({"dedup_db_connect_timeout": 0}, "dedup_db_connect_timeout must be at least 1"),
        "retries": ({"dedup_wait_idle_retries": -1}, "dedup_wait_idle_retries must be 0 or more"),
        "regex": ({"dedup_etl_process_pattern": "run_etl("}, "dedup_etl_process_pattern 'run_etl(' is not a valid"),
        "cron": ({"dedup_etl_cron_pattern": ""}, "dedup_etl_cron_pattern must be a non-empty regular expression"),
        "schema": ({"dedup_backup_schema": "breezeway"}, "dedup_backup_schema must differ from dedup_schema"),
        "longschema": ({"dedup_schema": "s" * 64}, "longer than PostgreSQL's 63-byte limit"),
        "dir": ({"dedup_backup_dir": "backups"}, "dedup_backup_dir must be an absolute path"),
        "run_id": ({"dedup_run_id": "../x"}, "dedup_run_id must be letters"),
        "now": ({"dedup_now": "yesterday"}, "dedup_now must be empty or an ISO 8601 time"),
        "ignore": ({"dedup_ignore_columns": ["id", ""]}, "dedup_ignore_columns must be a list of column names"),
        "empty": ({"dedup_tables": []}, "dedup_tables must list at least one table"),
        "twice": ({"dedup_tables": [{"name": "t", "natural_key": ["a"]}, {"name": "t", "natural_key": ["b"]}]},
                  "dedup_tables[1] (t): table 't' is listed twice (also dedup_tables[0])"),
        "nokey": ({"dedup_tables": [{"name": "t", "natural_key": []}]},
                  "dedup_tables[0] (t).natural_key must be a non-empty list"),
        "dupcol": ({"dedup_tables": [{"name": "t", "natural_key": ["a", "a"]}]}, "names a column twice"),
        "order_by": ({"dedup_tables": [{"name": "t", "natural_key": ["a"], "order_by": ""}]},
                     "dedup_tables[0] (t).order_by must be a non-empty name"),
    }
    for case, (over, text) in cases.items():
        problems = settings_filter.dedup_settings_problems(good_settings(**over))
        assert len(problems) == 1 and text in problems[0], (case, problems)
    assert settings_filter.dedup_settings_problems(good_settings(dedup_now="2025-12-10T06:00:00Z")) == []


def test_spec_options_merge_entry_points_and_drop_defaults():
    spec = {"argument_specs": {
        "main": {"options": {"a": {"type": "int", "default": 1}}},
        "plan": {"options": {"b": {"type": "list", "elements": "dict", "default": "{{ x }}",
                                   "options": {"c": {"type": "str", "default": "y"}}}}},
    }}
    assert settings_filter.dedup_spec_options(spec) == {
        "a": {"type": "int"}, "b": {"type": "list", "elements": "dict", "options": {"c": {"type": "str"}}}}


# --------------------------------------------------------------------------- real runs on one lab

TABLES_OK = [{"name": "task_tags", "natural_key": ["task_pk", "tag_pk"]}]

# (playbook, extra vars, what the failure message must say)
BAD = {
    "dedup_mode": (DEPLOY, {"dedup_mode": "onlin"}, "value of dedup_mode must be one of: offline, online, got: onlin"),
    "dedup_backup_mode": (DEPLOY, {"dedup_backup_mode": "tables"}, "value of dedup_backup_mode must be one of"),
    "dedup_db_port_type": (DEPLOY, {"dedup_db_port": "abc"}, "argument 'dedup_db_port' is of type"),
    "dedup_db_port_range": (DEPLOY, {"dedup_db_port": 70000}, "dedup_db_port must be a port number (1-65535)"),
    "dedup_db_sslmode": (DEPLOY, {"dedup_db_sslmode": "on"}, "value of dedup_db_sslmode must be one of"),
    "dedup_db_connect_timeout": (DEPLOY, {"dedup_db_connect_timeout": "10s"}, "'dedup_db_connect_timeout' is of type"),
    "dedup_tables_kep": (DEPLOY, {"dedup_tables": [dict(TABLES_OK[0], kep="newest")]}, "dedup_tables.kep"),
    "dedup_tables_natural_kye": (DEPLOY, {"dedup_tables": [{"name": "task_tags", "natural_kye": ["task_pk"]}]},
                                 "dedup_tables.natural_kye"),
    "dedup_tables_keep": (DEPLOY, {"dedup_tables": [dict(TABLES_OK[0], keep="youngest")]},
                          "value of keep must be one of: oldest, newest, got: youngest found in dedup_tables"),
    "dedup_tables_twice": (DEPLOY, {"dedup_tables": TABLES_OK * 2}, "table 'task_tags' is listed twice"),
    "dedup_tables_type": (DEPLOY, {"dedup_tables": "task_tags"}, "dedup_tables"),
    "dedup_ignore_columns": (DEPLOY, {"dedup_ignore_columns": {"id": 1}}, "'dedup_ignore_columns' is of type"),
    "dedup_etl_process_pattern": (DEPLOY, {"dedup_etl_process_pattern": "run_etl("},
                                  "dedup_etl_process_pattern 'run_etl(' is not a valid regular expression"),
    "dedup_wait_idle_retries": (DEPLOY, {"dedup_wait_idle_retries": -1}, "dedup_wait_idle_retries must be 0 or more"),
    "dedup_allow_divergent": (DEPLOY, {"dedup_allow_divergent": "maybe"}, "'dedup_allow_divergent' is of type"),
    "dedup_backup_dir": (DEPLOY, {"dedup_backup_dir": "backups"}, "dedup_backup_dir must be an absolute path"),
    "backup_format": (DEPLOY, {"backup_format": "zip"}, "value of backup_format must be one of: custom, directory"),
    "preflight_strategy": (DEPLOY, {"preflight_strategy": "fast"}, "value of preflight_strategy must be one of"),
    "migrate_retries": (DEPLOY, {"migrate_retries": "many"}, "'migrate_retries' is of type"),
    "etl_pause_wait_seconds": (DEPLOY, {"etl_pause_wait_seconds": "soon"}, "'etl_pause_wait_seconds' is of type"),
    "rollback_dedup_mode": (ROLLBACK, {"dedup_mode": "onlin"}, "value of dedup_mode must be one of"),
    "rollback_restore_source": (ROLLBACK, {"restore_source": "tape"}, "value of restore_source must be one of"),
}


def test_bad_settings_fail_in_the_first_play_naming_them_and_change_nothing(lab):
    """One lab, one real run per bad value: each stops in the first play with a message naming the setting."""
    cron_before = lab.crontab()
    counts_before = lab.counts()
    release_before = lab.current_release()
    problems = []
    for case, (playbook, extra, text) in BAD.items():
        res = lab.playbook(playbook, extra_vars=extra)
        out = " ".join(res.output.split())
        plays = [line.rstrip("* ") for line in res.stdout.splitlines() if line.startswith("PLAY [")]
        if res.rc == 0:
            problems.append(f"{case}: rc 0")
        elif text not in out:
            problems.append(f"{case}: {text!r} not in the output: {out[-1500:]}")
        elif plays != [FIRST_PLAY]:
            problems.append(f"{case}: got past the first play: {plays}")
    assert not problems, "\n".join(problems)
    assert lab.crontab() == cron_before
    assert lab.counts() == counts_before
    assert lab.current_release() == release_before
    assert lab.query("SELECT to_regnamespace('dedup_rollout') IS NULL")[0][0], "a ledger was created"
    assert not (lab.root / "reports").exists() or not any((lab.root / "reports").rglob("report.json"))


def test_good_settings_pass_the_first_play(lab):
    """The lab's own settings plus a valid dedup_tables with keep/order_by pass, in --check."""
    tables = [{"name": "task_tags", "natural_key": ["task_pk", "tag_pk"], "keep": "newest", "order_by": "id"}]
    res = lab.playbook(DEPLOY, check=True, extra_vars={"dedup_tables": tables, "backup_format": "directory"})
    assert res.rc == 0, res.output[-4000:]
    assert "PLAY [Preflight (runbook step 1)]" in res.stdout
