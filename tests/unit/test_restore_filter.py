"""roles/restore/filter_plugins/restore.py: what a rollback undoes per table (pure)."""

from __future__ import annotations

import hashlib

from _load import by_path

restore = by_path("roles/restore/filter_plugins/restore.py", "dedup_restore_filter")


def row(name, status="deduplicated", removed=5, created=True, constraint=None, key=("x",)):
    return {"table_name": name, "natural_key": list(key), "status": status, "rows_removed": removed,
            "constraint_created": created, "constraint_name": constraint, "backup_table": f"{name}__r1"}


def todo(*rows):
    return {t["table_name"]: t for t in restore.restore_tables_to_undo(list(rows))}


def what(t):
    return t["drop_constraint"], t["constraint_inferred"], t["needs_rows"]


def test_only_deduplicated_and_constrained_tables_are_undone():
    out = restore.restore_tables_to_undo([row("a"), row("b", "rolled_back"), row("c", "planned"),
                                          row("d", "constrained", created=True, constraint="d_x_key")])
    assert [t["table_name"] for t in out] == ["a", "d"]
    assert restore.restore_tables_to_undo([]) == [] and restore.restore_tables_to_undo(None) == []


def test_the_recorded_constraint_is_dropped():
    t = todo(row("a", created=True, constraint="a_custom"))["a"]
    assert what(t) == ("a_custom", False, True)


def test_a_constraint_the_deploy_did_not_record_is_inferred_after_removed_rows_only():
    got = todo(row("a", created=False), row("b", removed=0, created=False), row("c", removed=None, created=None),
               row("d", "constrained", removed=3, created=False, constraint="d_old"),
               row("e", created=True, constraint=""))
    assert what(got["a"]) == ("a_x_key", True, True)
    assert what(got["b"]) == (None, False, False)
    assert what(got["c"]) == (None, False, False)
    # A constraint that was already there (not created by the deploy) stays.
    assert what(got["d"]) == (None, False, True)
    # Created but its name not recorded: the name the deploy gives it.
    assert what(got["e"]) == ("e_x_key", True, True)


def test_the_ledger_row_is_kept_and_extended():
    src = row("a", created=False)
    t = restore.restore_tables_to_undo([src])[0]
    assert list(t) == [*src, "drop_constraint", "constraint_inferred", "needs_rows"]
    assert {k: t[k] for k in src} == src
    assert "drop_constraint" not in src, "the ledger row itself is not changed"


def test_default_constraint_name_fits_63_characters():
    assert restore.restore_default_constraint_name("t", ["a", "b"]) == "t_a_b_key"
    exact = "t" * 55 + "_col_key"
    assert len(exact) == 63 and restore.restore_default_constraint_name("t" * 55, ["col"]) == exact
    long = "a_very_long_table_name_that_goes_on_and_on_for_ever_first_column_second_column_key"
    name = restore.restore_default_constraint_name("a_very_long_table_name_that_goes_on_and_on_for_ever",
                                                   ["first_column", "second_column"])
    assert name == long[:54] + "_" + hashlib.sha1(long.encode()).hexdigest()[:8]
    assert name == "a_very_long_table_name_that_goes_on_and_on_for_ever_fi_4e13fd14"
    assert len(name) == 63


def test_default_constraint_name_counts_bytes_like_fit_name():
    # 60 characters but 114 bytes: cut like the name the constraint really got (module_utils fit_name).
    from _load import module_util
    fit_name = module_util("dedup_pg").fit_name
    for table, key in (("é" * 54, ["k"]), ("таблица_" * 5, ["ключ", "id"]), ("t" * 55, ["col"]), ("t", ["a"])):
        name = restore.restore_default_constraint_name(table, key)
        assert name == fit_name(f"{table}_{'_'.join(key)}_key") and len(name.encode()) <= 63


def test_filter_is_registered():
    assert restore.FilterModule().filters() == {"restore_tables_to_undo": restore.restore_tables_to_undo}
