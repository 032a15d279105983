"""module_utils/dedup_locks.py: the one retry loop for lock waits and the one description of the sessions in the
way (pure: a fake connection, fake driver errors, no cluster)."""

from __future__ import annotations

import pytest
from _load import module_util

locks = module_util("dedup_locks")


class PgError(Exception):
    """Stands in for a psycopg2 error: a SQLSTATE and the server's message."""

    def __init__(self, pgcode, text="ERROR:  canceling statement due to lock timeout\nCONTEXT:  while locking"):
        super().__init__(text)
        self.pgcode = pgcode
        self.pgerror = text


class FakeConn:
    """Counts rollbacks; autocommit and closed as psycopg2 has them."""

    def __init__(self, autocommit=False):
        self.autocommit = autocommit
        self.closed = 0
        self.rollbacks = 0

    def rollback(self):
        self.rollbacks += 1

    def cursor(self):
        raise AssertionError("no look-up expected")


class Watch:
    """A PlayWatch stand-in: gone after ``after`` look-ups."""

    def __init__(self, after=None):
        self.after = after
        self.asked = 0
        self.run_lock_id = None

    def gone(self, _cur):
        self.asked += 1
        return self.after is not None and self.asked >= self.after


class CursorConn(FakeConn):
    class _Cur:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def cursor(self):
        return self._Cur()


def failing(codes, result="done"):
    """An attempt that fails with the given SQLSTATEs in turn, then returns ``result``; records the numbers."""
    seen = []

    def attempt(number):
        seen.append(number)
        if len(seen) <= len(codes):
            raise PgError(codes[len(seen) - 1])
        return result

    return attempt, seen


def test_one_set_of_retryable_sqlstates():
    assert set(locks.RETRYABLE) == {"55P03", "40P01", "40001"}
    assert locks.is_retryable(PgError("55P03")) and locks.is_retryable(PgError("40P01"))
    for code in ("57014", "23505", "57P01", None):  # statement timeout / cancel, unique violation, shutdown
        assert not locks.is_retryable(PgError(code))
    assert not locks.is_retryable(ValueError("x"))


def test_retries_then_returns_the_result_and_the_attempts():
    conn, sleeps, retried = FakeConn(), [], []
    attempt, seen = failing(["55P03", "40P01"])
    result = locks.with_lock_retries(conn, attempt, retries=5, delay=0.5, sleep=sleeps.append,
                                     before_retry=lambda n, exc: retried.append((n, exc.pgcode)))
    assert result == ("done", 3) and seen == [1, 2, 3]
    assert sleeps == [0.5, 0.5] and retried == [(1, "55P03"), (2, "40P01")]
    assert conn.rollbacks == 2  # every failed attempt's transaction


def test_out_of_attempts_raises_with_the_last_error():
    conn, sleeps = FakeConn(), []
    attempt, seen = failing(["55P03"] * 10)
    with pytest.raises(locks.LockRetriesExhausted) as info:
        locks.with_lock_retries(conn, attempt, retries=2, delay=1, sleep=sleeps.append)
    assert info.value.attempts == 3 and seen == [1, 2, 3] and len(sleeps) == 2  # no pause after the last one
    assert info.value.error.pgcode == "55P03" and info.value.__cause__ is info.value.error
    assert "canceling statement due to lock timeout" in str(info.value) and "CONTEXT" not in str(info.value)


def test_retries_zero_means_one_attempt_and_negative_delay_means_none():
    attempt, seen = failing(["55P03"])
    with pytest.raises(locks.LockRetriesExhausted):
        locks.with_lock_retries(FakeConn(), attempt, retries=0, delay=-3, sleep=lambda s: None)
    assert seen == [1]
    sleeps = []
    attempt, _ = failing(["55P03"])
    assert locks.with_lock_retries(FakeConn(), attempt, retries=1, delay=-3, sleep=sleeps.append)[1] == 2
    assert sleeps == [0.0]


def test_other_errors_propagate_unchanged_after_the_rollback():
    conn = FakeConn()
    attempt, seen = failing(["57014"])  # statement_timeout: as slow the next time
    with pytest.raises(PgError) as info:
        locks.with_lock_retries(conn, attempt, retries=5, delay=0, sleep=lambda s: None)
    assert info.value.pgcode == "57014" and seen == [1] and conn.rollbacks == 1


def test_autocommit_or_closed_connection_is_not_rolled_back():
    for conn in (FakeConn(autocommit=True), FakeConn()):
        if not conn.autocommit:
            conn.closed = 2
        attempt, _ = failing(["55P03"])
        locks.with_lock_retries(conn, attempt, retries=1, delay=0, sleep=lambda s: None)
        assert conn.rollbacks == 0


def test_stops_between_attempts_once_the_play_is_gone():
    conn, watch = CursorConn(), Watch(after=2)
    attempt, seen = failing(["55P03"] * 10)
    with pytest.raises(locks.PlayGone) as info:
        locks.with_lock_retries(conn, attempt, retries=10, delay=0, watch=watch, sleep=lambda s: None)
    assert info.value.attempts == 2 and seen == [1, 2] and watch.asked == 2
    assert conn.autocommit is False  # left as it was found


def test_play_gone_cannot_tell_means_not_gone():
    class Broken(CursorConn):
        def cursor(self):
            raise RuntimeError("connection broken")

    assert locks.play_gone(Broken(), Watch(after=1)) is False
    assert locks.play_gone(CursorConn(), None) is False
    closed = CursorConn()
    closed.closed = 1
    assert locks.play_gone(closed, Watch(after=1)) is False


SESSION = {"pid": 4242, "user": "etl", "application": "psql", "state": "idle in transaction",
           "mode": "AccessShareLock", "granted": True, "holds": "AccessShareLock", "waiting_for": None,
           "query_start": "2026-11-30T10:00:00Z", "xact_seconds": 75, "wait_event": "Client:ClientRead",
           "query": "SELECT count(*) FROM breezeway.task_photos"}


def test_a_session_is_described_with_everything_a_dba_needs():
    text = locks.describe_session(SESSION)
    assert text.startswith("pid 4242 (")  # "pid N " is what the tests and docs look for
    for part in ("user etl", "application psql", "idle in transaction", "holds AccessShareLock",
                 "query since 2026-11-30T10:00:00Z", "transaction open 75 s", "waiting on Client:ClientRead"):
        assert part in text
    assert text.endswith("): SELECT count(*) FROM breezeway.task_photos")
    waiter = dict(SESSION, pid=7, mode="AccessExclusiveLock", granted=False, holds=None,
                  waiting_for="AccessExclusiveLock", xact_seconds=None, wait_event="Lock:relation", application="")
    text = locks.describe_session(waiter)
    assert "waits for AccessExclusiveLock" in text and "holds" not in text and "application -" in text
    assert "transaction open" not in text


def test_no_session_says_so():
    assert locks.describe_sessions([]) == locks.NONE_VISIBLE
    assert locks.describe_sessions([SESSION, dict(SESSION, pid=5)]).count("pid ") == 2


def test_the_failure_message_names_table_attempts_error_and_sessions():
    msg = locks.lock_failure_message("breezeway.task_photos", 3, PgError("55P03"), [SESSION], lock_timeout="2s",
                                     delay=1, outcome="nothing changed in this table", advice="Re-run.")
    assert msg.startswith("could not lock breezeway.task_photos after 3 attempts (lock_timeout 2s each; 1 s apart; "
                          "last error: ERROR:  canceling statement due to lock timeout)")
    assert "; nothing changed in this table. Sessions in the way: pid 4242 (" in msg and msg.endswith(" Re-run.")
    short = locks.lock_failure_message('table "s"."t"', 1, "boom", [])
    assert short == 'could not lock table "s"."t" after 1 attempts (last error: boom). Sessions in the way: ' \
                    + locks.NONE_VISIBLE + "."
