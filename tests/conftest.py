"""Shared fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import os
import uuid

import pytest

from harness import REPO, PgCluster, destroy_cluster, run_playbook, start_cluster

os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))

pytest_plugins = ["labkit"]

# The long files first (seconds per file measured 2026-11-26 after the first four). With ``-n 2 --dist loadfile
# --no-loadscope-reorder`` (the Makefile) pytest-xdist hands out files in this order: one each, one more each,
# then the next file to whichever worker runs short. So the first four split 625 s / 635 s, and the rest go
# longest first.
LONGEST_FIRST = [
    "test_deploy.py", "test_rollback.py", "test_kill_rollback.py", "test_kill_deploy.py",  # 470 340 155 295
    "test_faults.py", "test_online.py",
    "test_ssh.py",  # added 2026-11-30: 590 s alone (chain 340 s + kill 250 s, under load from other runs)
    "test_tags.py",  # added 2026-11-30 (issue 18), seconds alone incl. the lab template: 270
    # added 2026-11-30, seconds measured alone: 220 200 175 150 110 100
    "test_operator.py", "test_versions.py", "test_shapes.py", "test_backup_dump.py", "test_preflight_neighbours.py",
    "test_settings.py",
    "test_faults_backup.py", "test_etl_roles.py", "test_monitor.py",
    "test_progress.py",  # added 2026-11-30 (issue 18): 100 s alone incl. the lab template
    "test_lab.py", "test_cleanup.py", "test_load.py", "test_security.py", "test_bad_input.py",
    "test_tls.py",  # added 2026-11-30 (issue 18): 55 s alone (its own TLS cluster)
    "test_bench_smoke.py", "test_etl.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


@pytest.fixture(scope="session")
def pg() -> PgCluster:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        destroy_cluster(cluster)


@pytest.fixture
def fresh_db(pg: PgCluster):
    """An empty database, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    pg.create_database(name)
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture
def playbook():
    return run_playbook
