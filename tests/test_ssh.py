"""The rollout as production runs it (issue 16): over SSH as an unprivileged user with sudo, separate db and etl
hosts, the inventory built from inventory/production (tests/sshkit.py).

Real parts only: our own sshd on 127.0.0.2/127.0.0.3, the real ansible-playbook over SSH with become, the lab's
database on the harness cluster, the ETL user's real crontab and releases. Few and fat: one chain of deploy,
monitor, rollback and cleanup (every role runs over SSH), and one killed controller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

from sshkit import HOSTS, holder_gone_within, ssh_lab, ssh_topology  # noqa: F401  (fixtures)
from test_deploy import NATURAL_KEYS
from test_deploy import snapshot as snapshot_sets
from test_faults import accounted, assert_final
from test_rollback import (
    DEPLOY,
    LEDGER,
    ROLLBACK,
    assert_rolled_back,
    etl_writes,
    flat,
    runs,
    snapshot,
    table_runs,
    unique_constraints,
)

from harness import REPO

MONITOR = REPO / "playbooks" / "monitor.yml"
CLEANUP = REPO / "playbooks" / "cleanup.yml"
DB, ETL = HOSTS["db"][0], HOSTS["etl"][0]


def accepted_logins(topo) -> int:
    """Public-key logins our sshd accepted for the topology's user so far."""
    return (topo.root / "sshd.log").read_text().count(f"Accepted publickey for {topo.user} ")


def assert_green(res, *hosts):
    assert res.rc == 0, res.output[-6000:]
    for h in hosts:
        assert h in res.recap and res.recap[h]["failed"] == 0 and res.recap[h]["unreachable"] == 0, res.recap


def test_deploy_monitor_rollback_cleanup_over_ssh(ssh_lab, ssh_topology):  # noqa: F811
    lab = ssh_lab
    original = snapshot(lab)
    uniq_before = lab.unique_counts()
    cons_before = unique_constraints(lab)
    cron_before = lab.crontab()
    logins = accepted_logins(ssh_topology)

    res = lab.playbook(DEPLOY)
    assert_green(res, DB, ETL)
    assert accepted_logins(ssh_topology) > logins, "the deploy did not go through our sshd"
    assert "Smoke test of releases/v2 passed" in flat(res.output), res.output[-6000:]
    assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
    assert lab.counts() == uniq_before
    cons = unique_constraints(lab)
    assert len(cons) >= len(NATURAL_KEYS)
    assert lab.current_release() == "releases/v2"
    assert lab.crontab() == cron_before
    (deploy_id,) = [r for r, v in runs(lab).items() if v["kind"] == "deploy" and v["status"] == "succeeded"]
    assert holder_gone_within(lab, 5) is not None, "the deploy left its run lock held"
    dumps = list(lab.backup_dir.iterdir())
    assert dumps, "no dump on the db host"

    res = lab.playbook(MONITOR)
    assert_green(res, DB, ETL)

    etl_writes(lab)
    after_etl = snapshot(lab)
    res = lab.playbook(ROLLBACK)
    assert_green(res, DB, ETL)
    assert_rolled_back(lab, original, after_etl, cons_before, cron_before, deploy_id)

    res = lab.playbook(CLEANUP, extra_vars={"cleanup_force": True})
    assert_green(res, DB)
    for t, v in table_runs(lab, deploy_id).items():
        if v["backup_table"]:
            assert not lab.query("SELECT to_regclass(%s) IS NOT NULL",
                                 (f"{LEDGER}.{v['backup_table']}",))[0][0], t
    assert not any(p.exists() for p in dumps), "the dump is still there"


def test_controller_killed_mid_migration_releases_the_lock_over_ssh(ssh_lab, ssh_topology):  # noqa: F811
    """SIGKILL of the controller's ansible-playbook process group while the migration runs on the db host over SSH:
    the run lock's holder (a detached process on the db host) lets the lock go within 60 s, nothing changes the
    database after that, and a re-run finishes the deploy."""
    lab = ssh_lab
    original = snapshot_sets(lab)
    cron_before = lab.crontab()
    proc = lab.start_playbook(DEPLOY)
    lines: list[str] = []
    seen = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "TASK [migrate : Deduplicate each table" in line:
                seen.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    end = time.monotonic() + 600
    while not seen.is_set() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    assert seen.is_set() and proc.poll() is None, "".join(lines)[-5000:]
    time.sleep(0.3)
    assert lab.query("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'dedup-rollout/lock%%' "
                     "AND datname = current_database()")[0][0] == 1, "no run lock held before the kill"
    # The controller dies: its process group (ansible-playbook, its workers, their ssh clients). Ansible's
    # ControlPersist ssh master is a daemon of its own and lingers, as it would on an operator's machine.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait(timeout=30)
    th.join(timeout=10)
    output = "".join(lines)
    assert "PLAY RECAP" not in output, "the run ended before the kill"

    released = holder_gone_within(lab, 90)
    # Ansible's forked workers run in sessions of their own: they outlive the group kill, blocked on a pipe to the
    # dead controller. Measured above with them left alone; now they go, so no process outlives the test.
    subprocess.run(["pkill", "-9", "-f", str(lab.inventory)], check=False)
    assert released is not None, "the run lock is still held 90 s after the controller was killed"
    released_after = time.monotonic() - killed_at
    print(f"\nrun lock released {released_after:.1f} s after the controller was killed")
    assert released_after <= 60, f"the run lock was released only {released_after:.1f} s after the kill"

    # Nothing keeps changing the database once the lock is gone: no busy dedup-rollout session, same rows.
    lab.settle(timeout=60, quiet_seconds=3)
    assert not lab.query("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND application_name LIKE 'dedup-rollout/%%'")[0][0], "a module is still connected"
    before = snapshot_sets(lab)
    time.sleep(5)
    assert snapshot_sets(lab) == before, "the database changed after the lock was released"
    accounted(lab, original)

    res = lab.playbook(DEPLOY)
    assert_green(res, DB, ETL)
    assert_final(lab, original, cron_before)
