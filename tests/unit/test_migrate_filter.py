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
