"""Smoke test of the benchmark (bench/run_bench.py): a tiny scale, contenders A1 and B-online.

Real parts: the script starts its own cluster (default durability), builds the runbook-shaped
database, runs the runbook's SQL with the real psql, and writes its JSON. We check the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys

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
