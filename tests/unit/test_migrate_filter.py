"""roles/migrate/filter_plugins/migrate.py: the NULLS NOT DISTINCT decision of both migration paths (pure)."""

from __future__ import annotations

from _load import by_path

migrate = by_path("roles/migrate/filter_plugins/migrate.py", "dedup_migrate_filter")
nnd = migrate.migrate_nulls_not_distinct


def test_auto_follows_nullable_keys_on_15_and_later():
    assert nnd({"key_nullable": ["k"]}, "auto", 150004) is True
    assert nnd({"key_nullable": ["k"]}, "auto", "140011") is False
    assert nnd({"key_nullable": []}, "auto", 180000) is False


def test_an_existing_constraint_keeps_its_own_setting_and_forced_values_win_otherwise():
    assert nnd({"existing_constraint": {"nulls_not_distinct": True}, "key_nullable": []}, "false", 150000) is True
    assert nnd({"existing_constraint": {"nulls_not_distinct": False}, "key_nullable": ["k"]}, "auto", 150000) is False
    assert nnd({"existing_constraint": None, "key_nullable": []}, "true", 140000) is True
    assert nnd({"key_nullable": ["k"]}, False, 150000) is False


def test_constraints_of_the_plan_in_order_with_the_ledger_record_only_when_asked():
    plan = {"server": {"version_num": 150004}, "tables": [
        {"schema": "s", "table": "a", "natural_key": ["k"], "key_nullable": ["k"], "keep": "oldest",
         "order_by": "id", "ledger": None},
        {"schema": "s", "table": "b", "natural_key": ["x", "y"], "key_nullable": [], "keep": "newest",
         "order_by": "ts", "ledger": {"status": "constrained"}},
        {"schema": "s", "table": "c", "natural_key": ["z"], "key_nullable": [], "ledger": None,
         "existing_constraint": {"nulls_not_distinct": True}},
    ]}
    out = migrate.migrate_constraints(plan, ["a"], "auto", True)
    assert [e["table"] for e in out] == ["a", "b", "c"]
    assert [e["nulls_not_distinct"] for e in out] == [True, False, True]
    assert [e["record_always"] for e in out] == [True, True, False]
    assert out[1]["record"] == {"natural_key": ["x", "y"], "keep": "newest", "order_by": "ts"}
    assert out[1]["columns"] == ["x", "y"]
    check = migrate.migrate_constraints(plan, ["a"], "auto", False)
    assert all("record" not in e and "record_always" not in e for e in check)
    assert migrate.migrate_constraints({"tables": []}, [], "auto") == []
