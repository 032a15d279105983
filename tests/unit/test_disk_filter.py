"""roles/preflight/filter_plugins/preflight.py: the disk space the migration needs in the data directory (pure)."""

from __future__ import annotations

import pytest
from _load import by_path

preflight = by_path("roles/preflight/filter_plugins/preflight.py", "dedup_preflight_filter")
need = preflight.preflight_data_bytes

MB = 1 << 20


def plan(table, heap, size):
    return {"table": table, "heap_size": heap, "size_before": size}


def dups(table, total, duplicates):
    return {"table": table, "total_rows": total, "duplicate_rows": duplicates}


def test_backup_table_mode_counts_removed_rows_stash_and_reinsert_and_indexes():
    # 3 of 4 rows removed: heap 100 MB x (0.75 backup table + 2 x 0.25 stash and re-insert) + 20 MB indexes x 0.25
    assert need([plan("a", 100 * MB, 120 * MB)], [dups("a", 4, 3)], "table") == 125 * MB + 5 * MB


def test_dump_mode_needs_no_backup_table():
    assert need([plan("a", 100 * MB, 120 * MB)], [dups("a", 4, 3)], "dump") == 50 * MB + 5 * MB


def test_tables_without_duplicates_or_rows_need_nothing():
    tables = [plan("a", 100 * MB, 120 * MB), plan("b", 8192, 16384), plan("c", 8192, 8192)]
    assert need(tables, [dups("a", 10, 0), dups("b", 0, 0), dups("c", 0, 5)], "table") == 0
    assert need([], [], "table") == 0 and need(None, None, "dump") == 0


def test_tables_are_matched_by_name_and_summed():
    tables = [plan("a", 1000, 1000), plan("b", 3000, 4000)]
    counts = [dups("b", 3, 1), dups("a", 2, 1)]
    # a: 1000 x (0.5 + 1.0) = 1500; b: 3000 x (1/3 + 4/3) + 1000 x 2/3 = 5000 + 666.67
    assert need(tables, counts, "table") == 7166


def test_numbers_as_text_and_truncation_like_the_int_filter():
    assert need([plan("a", "1000", "1001")], [dups("a", "3", "1")], "dump") == 1334  # 1333.33 + 0.67 -> 1334.0
    assert need([plan("a", 10, 10)], [dups("a", 3, 1)], "table") == 16  # 16.67 truncated, not rounded
    assert need([plan("a", None, "x")], [dups("a", 2, 1)], "table") == 0
    assert isinstance(need([plan("a", 10, 10)], [dups("a", 3, 1)], "table"), int)


def test_a_table_without_a_duplicate_count_is_an_error():
    with pytest.raises(ValueError, match="no duplicate count for table 'a'"):
        need([plan("a", 1, 1)], [dups("b", 2, 1)], "table")


def test_filter_is_registered():
    assert preflight.FilterModule().filters() == {"preflight_data_bytes": need}
