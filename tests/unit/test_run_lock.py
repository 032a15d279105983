"""library/pg_run_lock.py: the holder's pid file names one lock on one server."""

from __future__ import annotations

from _load import by_path

lock = by_path("library/pg_run_lock.py", "dedup_unit_pg_run_lock")


def test_pid_file_differs_per_server_for_the_same_database_name():
    # Two regions whose databases share a name, locked from one machine: a release of one must not stop the other.
    north = lock.pidfile_name("dedup-rollout", {"host": "db-north.example", "port": 5432}, "breezeway")
    south = lock.pidfile_name("dedup-rollout", {"host": "db-south.example", "port": 5432}, "breezeway")
    other_port = lock.pidfile_name("dedup-rollout", {"host": "db-north.example", "port": 5433}, "breezeway")
    assert len({north, south, other_port}) == 3


def test_pid_file_is_stable_and_per_database():
    kw = {"host": "127.0.0.1", "port": 55432}
    assert lock.pidfile_name("dedup-rollout", kw, "a") == lock.pidfile_name("dedup-rollout", dict(kw), "a")
    assert lock.pidfile_name("dedup-rollout", kw, "a") != lock.pidfile_name("dedup-rollout", kw, "b")
    assert lock.pidfile_name("dedup-rollout", {}, "a").startswith("lock-")
