"""Smoke test of the benchmark (bench/run_bench.py): a tiny scale, contenders A1 and B-online.

Real parts: the script starts its own cluster (default durability), builds the runbook-shaped
database, runs the runbook's SQL with the real psql, and writes its JSON. We check the JSON.
The `regions` contender (deploy_dedup.yml on 1 and on N regions, minutes even at a tiny scale) is not run
here; its generated inventory is checked with the real ansible-inventory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO


def test_bench_smoke_writes_expected_json(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_bench.py"), "--scale", "0.002", "--contenders", "A1,B-online",
         "--results-dir", str(results)],  # cluster under bench/work (the postgres user must reach it)
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| A1" in proc.stdout and "max writer stall ms" in proc.stdout

    latest = json.loads((results / "latest.json").read_text())
    per_scale = [p for p in results.glob("*-scale0.002.json")]
    assert len(per_scale) == 1
    assert json.loads(per_scale[0].read_text())["scale"] == 0.002

    machine = latest["machine"]
    assert machine["nproc"] >= 1 and machine["ram_gb"] > 0 and machine["pg_version"]
    assert machine["pg_settings"]["fsync"] == "on"
    assert machine["pg_settings"]["full_page_writes"] == "on"

    (run,) = latest["runs"]
    assert run["build"]["tables"]["task_requirements"] == {"rows": 48348, "unique_keys": 53}
    assert set(run["explain_a_delete"]) == {"task_requirements", "property_photos", "reservation_guests",
                                            "task_assignments", "task_photos", "task_comments"}
    assert all(isinstance(v["A1"]["hashed_subplan"], bool) for v in run["explain_a_delete"].values())

    row, online = run["contenders"]
    assert row["contender"] == "A1" and row["status"] == "ok"
    # The online row: the whole playbook in dedup_mode online, with the concurrent writer.
    assert online["contender"] == "B-online" and online["status"] == "ok", online.get("detail", {}).get("error")
    assert online["check"]["ok"] is True and online["writer_max_stall_ms"] < 1000
    assert online["check"]["writer_rows_found"] == online["check"]["writer_rows_committed"] > 0
    for field in ("seconds", "wal_mb", "peak_extra_disk_mb", "db_size_after_mb", "writer_max_stall_ms",
                  "ratio_vs_best_a"):
        assert isinstance(row[field], (int, float)), field
    assert row["seconds"] > 0 and row["wal_mb"] > 0 and row["ratio_vs_best_a"] == 1.0
    check = row["check"]
    assert check["ok"] is True
    assert all(t["duplicates"] == 0 and t["unique_constraint"] for t in check["tables"].values())
    assert check["writer_rows_found"] == check["writer_rows_committed"] > 0
    # The runbook's backup tables hold every original row (plus the writer's rows copied in time).
    assert check["backup_tables_rows"]["breezeway.task_requirements_backup"] >= 48348


def test_bench_regions_inventory_gives_each_region_its_own_database(tmp_path):
    """The `regions` contender's inventory (no ansible-playbook run: that takes minutes, see bench/README.md):
    N db hosts in N region groups, an empty etl group, each host's own dedup_db_name from host_vars (extra vars
    would override it), the shared settings with the password in a 0600 file, monitor_schedule off."""
    import importlib.util
    import os
    import types

    from harness import ansible_env

    spec = importlib.util.spec_from_file_location("run_bench", REPO / "bench" / "run_bench.py")
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    args = rb.parse_args([])
    assert args.regions == 4 and "regions" in args.contender_list
    assert rb.DEPLOY_PLAYBOOK == REPO / "deploy_dedup.yml" and rb.DEPLOY_PLAYBOOK.exists()

    cluster = types.SimpleNamespace(port=5999, superuser="bench_su", password="s3cret")
    ctx = {"cluster": cluster}
    dbs = ["bench_regions3_r1", "bench_regions3_r2", "bench_regions3_r3"]
    inv, secret = rb.write_regions_inventory(ctx, tmp_path, dbs, "bench-test-regions3")
    assert os.stat(secret).st_mode & 0o777 == 0o600
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inv), "--list"],
                          cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    hosts = ["bench-r1-db", "bench-r2-db", "bench-r3-db"]
    assert doc["db"]["hosts"] == hosts
    assert not doc.get("etl", {}).get("hosts")
    for i, (host, db) in enumerate(zip(hosts, dbs), 1):
        assert doc[f"region{i}"]["hosts"] == [host]
        hv = doc["_meta"]["hostvars"][host]
        assert hv["dedup_db_name"] == db
        assert hv["dedup_backup_mode"] == "table" and hv["monitor_schedule"] is False
        assert hv["dedup_db_port"] == 5999 and hv["dedup_run_id"] == "bench-test-regions3"
