"""Shared fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import os
import uuid

import pytest

from harness import REPO, PgCluster, destroy_cluster, run_playbook, start_cluster

os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))

pytest_plugins = ["labkit"]


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
