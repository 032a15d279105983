"""Load (issue 10): a read load keeps running while the offline migration runs.

pgbench (the server's own, on loopback) runs a custom script that reads the child tables with 2 clients
(rate-limited to RATE transactions/s, so the 2-core test machine still runs the deploy)
before, during and after a real deploy_dedup.yml on the lab. Each phase is a series of short pgbench runs
with per-transaction logs; the test prints (and writes to $DEDUP_LOAD_REPORT, when set) the transaction
count, error count and latency percentiles per phase, and asserts that no reader failed.

Documented reader behaviour in offline mode (strategy replace): while a table is rewritten (ACCESS
EXCLUSIVE, one short transaction per table) its readers wait; they never error and never see the table
empty (the snapshot guard, sql/migrate_table.sql.j2).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_deploy import DEPLOY

from harness import REPO, VENV_BIN, ansible_env

RATE = 100  # transactions per second (both clients): a steady load that leaves the 2 cores to the deploy
SCRIPT = """\\set pk random(1, 60)
SELECT count(*) FROM breezeway.task_requirements WHERE task_pk = :pk;
SELECT id, photo_id, url FROM breezeway.property_photos WHERE property_pk = :pk ORDER BY id LIMIT 5;
SELECT count(*) FROM breezeway.task_photos WHERE task_pk = :pk;
"""


def pgbench_once(lab, script: Path, seconds: int, workdir: Path) -> dict:
    """One pgbench run (2 clients); returns processed/failed counts and the latencies in ms."""
    prefix = workdir / f"pgb{time.monotonic_ns()}"
    env = dict(os.environ, PGPASSWORD=lab.password)  # the test's own process: not the tool under test
    proc = subprocess.run(
        [str(lab.pg.bindir / "pgbench"), "-n", "-f", str(script), "-c", "2", "-j", "2", "-R", str(RATE),
         "-T", str(seconds),
         "-h", "127.0.0.1", "-p", str(lab.pg.port), "-U", lab.db_user, "-l", "--log-prefix", str(prefix),
         lab.dbname],
        capture_output=True, text=True, env=env, cwd=workdir, timeout=seconds + 120,
    )
    lat = []
    for f in workdir.glob(prefix.name + "*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6:
                lat.append(int(parts[2]) / 1000.0)
        f.unlink()
    m = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    errors = int(m.group(1)) if m else 0
    aborted = len(re.findall(r"aborted|ERROR", proc.stderr))
    return {"rc": proc.returncode, "latencies": lat, "errors": errors + aborted,
            "stderr": proc.stderr[-2000:] if proc.returncode or aborted else ""}


def summarise(runs: list[dict]) -> dict:
    lat = sorted(x for r in runs for x in r["latencies"])

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2) if lat else None

    return {"transactions": len(lat), "errors": sum(r["errors"] for r in runs),
            "rc_nonzero": sum(1 for r in runs if r["rc"] != 0),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": round(lat[-1], 2) if lat else None,
            "stderr": [r["stderr"] for r in runs if r["stderr"]][:2]}


@pytest.mark.slow
def test_read_load_keeps_running_through_the_migration(lab, tmp_path):
    script = tmp_path / "readers.sql"
    script.write_text(SCRIPT)
    phases: dict[str, list[dict]] = {"before": [], "during": [], "after": []}
    phases["before"].append(pgbench_once(lab, script, 5, tmp_path))

    cmd = [str(VENV_BIN / "ansible-playbook"), str(DEPLOY), "-i", str(lab.inventory)]
    t0 = time.monotonic()
    deploy = subprocess.Popen(cmd, cwd=REPO, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    while deploy.poll() is None:
        phases["during"].append(pgbench_once(lab, script, 2, tmp_path))
    out = deploy.communicate()[0]
    seconds = time.monotonic() - t0
    assert deploy.returncode == 0, out[-4000:]
    phases["after"].append(pgbench_once(lab, script, 5, tmp_path))
    assert all(v == 0 for v in lab.duplicates().values())

    figures = {name: summarise(runs) for name, runs in phases.items()}
    figures["deploy_seconds"] = round(seconds, 1)
    print(f"\nread load (pgbench -c 2 -R {RATE}, 3 SELECTs on child tables per transaction):")
    for name in ("before", "during", "after"):
        f = figures[name]
        print(f"  {name:6s} tx={f['transactions']:6d} errors={f['errors']} p50={f['p50_ms']} ms "
              f"p95={f['p95_ms']} ms p99={f['p99_ms']} ms max={f['max_ms']} ms")
    print(f"  deploy took {figures['deploy_seconds']} s")
    if os.environ.get("DEDUP_LOAD_REPORT"):
        Path(os.environ["DEDUP_LOAD_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")
    for name, f in figures.items():
        if isinstance(f, dict):
            assert f["errors"] == 0 and f["rc_nonzero"] == 0, (name, f)
            assert f["transactions"] > 0, (name, f)

