"""plugins/filter/dedup.py: which db/etl hosts form a host's region (pure)."""

from __future__ import annotations

from _load import by_path

dedup = by_path("plugins/filter/dedup.py", "dedup_filter_regions")

PROD = {
    "all": ["db-n", "db-a", "etl-n", "etl-a"], "ungrouped": [],
    "db": ["db-n", "db-a"], "etl": ["etl-n", "etl-a"],
    "production": ["db-n", "db-a", "etl-n", "etl-a"],
    "nashville": ["db-n", "etl-n"], "austin": ["db-a", "etl-a"],
}


def test_the_smallest_group_holding_both_is_the_region():
    assert dedup.dedup_region_hosts("etl-a", PROD, "db") == ["db-a"]
    assert dedup.dedup_region_hosts("db-n", PROD, "etl") == ["etl-n"]
    assert dedup.dedup_region_name("etl-a", PROD) == "austin"


def test_a_host_in_no_region_belongs_with_every_host():
    lab = {"all": ["lab-db", "lab-etl"], "ungrouped": [], "db": ["lab-db"], "etl": ["lab-etl"]}
    assert dedup.dedup_region_hosts("lab-etl", lab, "db") == ["lab-db"]
    assert dedup.dedup_region_name("lab-etl", lab) == ""


def test_a_region_without_a_db_host_falls_back_to_all():
    groups = {**PROD, "tools": ["etl-a", "etl-n"]}
    assert dedup.dedup_region_hosts("etl-a", groups, "etl") == ["etl-a"]
    assert dedup.dedup_region_hosts("etl-a", {"db": ["db-1"], "etl": ["etl-a"], "x": ["etl-a"]}, "db") == ["db-1"]


def test_kind_is_checked():
    import pytest
    from ansible.errors import AnsibleFilterError
    with pytest.raises(AnsibleFilterError):
        dedup.dedup_region_hosts("db-n", PROD, "web")


def test_missing_names_the_region_hosts_without_the_fact():
    hostvars = {"etl-n": {"dedup_etl_ready": True}, "etl-a": {}, "db-n": {"dedup_db_ready": True}}
    assert dedup.dedup_region_missing("db-a", PROD, hostvars, "etl", "dedup_etl_ready") == ["etl-a"]
    assert dedup.dedup_region_missing("db-n", PROD, hostvars, "etl", "dedup_etl_ready") == []
    assert dedup.dedup_region_missing("etl-a", PROD, hostvars, "db", "dedup_db_ready") == ["db-a"]
    lab = {"all": ["lab-db", "lab-etl"], "db": ["lab-db"], "etl": ["lab-etl"]}
    assert dedup.dedup_region_missing("lab-db", lab, {}, "etl", "dedup_etl_done") == ["lab-etl"]
    assert dedup.dedup_region_missing("lab-db", {"db": ["lab-db"]}, {}, "etl", "dedup_etl_done") == []
