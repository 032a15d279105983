"""Shared fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import os
import uuid

import pytest

from harness import REPO, PgCluster, destroy_cluster, run_playbook, start_cluster

os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))

pytest_plugins = ["labkit"]

# The longest files first (minutes each, measured): with ``-n 2 --dist loadfile`` a worker takes the next
# file when it is free, so starting with the long ones keeps both workers busy to the end.
LONGEST_FIRST = ["test_faults.py", "test_kill_deploy.py", "test_kill_rollback.py", "test_online.py",
                 "test_deploy.py", "test_rollback.py", "test_security.py", "test_load.py", "test_bad_input.py"]


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
