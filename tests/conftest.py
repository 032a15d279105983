"""Shared fixtures: one throwaway PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from harness import REPO, PgCluster, destroy_cluster, run_playbook, start_cluster

os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))

pytest_plugins = ["labkit"]

# Files run longest first: ``-n 2 --dist loadfile --no-loadscope-reorder`` (the Makefile) hands them out in
# collection order, one each, then the next to whichever worker runs short, so the long ones must not come last.
# "Longest" is measured, not kept by hand: every run adds up each file's setup + call + teardown seconds and
# writes them to tests/durations.json (files that ran completely only). A file not measured yet goes first
# (assumed long), so a new test file never ends up alone at the end of the run.
DURATIONS = REPO / "tests" / "durations.json"


def _durations() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def pytest_collection_modifyitems(config, items):
    known = _durations()
    items.sort(key=lambda item: -known.get(_file(item.nodeid), float("inf")))  # stable: the order within a file stays
    _expect(config, [item.nodeid for item in items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under xdist the controller collects nothing itself: the workers' (identical) lists say what will run."""
    _expect(node.config, ids)


def _file(nodeid: str) -> str:
    """The test file of a node id, as pytest names it (relative to the rootdir: tests/test_x.py)."""
    return nodeid.split("::", 1)[0]


def _expect(config, nodeids) -> None:
    counts: dict[str, int] = {}
    for nodeid in nodeids:
        counts[_file(nodeid)] = counts.get(_file(nodeid), 0) + 1
    config._dedup_expected = counts


def pytest_runtest_logreport(report):
    """Add up each file's seconds (on the controller, xdist workers' reports included)."""
    name = _file(report.nodeid)
    _SEEN.setdefault(name, [0.0, set()])
    _SEEN[name][0] += report.duration
    if report.when == "teardown":
        _SEEN[name][1].add(report.nodeid)


_SEEN: dict[str, list] = {}


def pytest_sessionfinish(session, exitstatus):
    opt = session.config.option
    if hasattr(session.config, "workerinput") or opt.keyword or opt.markexpr or exitstatus not in (0, 1):
        return  # a worker (the controller writes), a partial selection, or an interrupted run: keep what is known
    expected = getattr(session.config, "_dedup_expected", {})
    measured = {name: round(secs, 1) for name, (secs, done) in _SEEN.items()
                if expected.get(name) and len(done) == expected[name]}
    if not measured:
        return
    merged = _durations()
    merged.update(measured)
    try:
        DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    except OSError:
        pass  # a read-only checkout: the order just stays as it was



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
