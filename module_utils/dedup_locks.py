"""Lock waits and their retries, once for every module that takes table locks.

Used by pg_migrate_table, pg_unique_constraint, pg_restore_rows and the online path (module_utils/dedup_online.py:
its short DDL transactions and its batches). Three things live here:

``with_lock_retries(conn, attempt, retries, delay, watch=...)``
    runs ``attempt(n)`` (n = 1, 2, ...) until it returns. After a failure the transaction is rolled back (when the
    connection is in one); an error whose SQLSTATE is in ``RETRYABLE`` is retried after ``delay`` seconds, at most
    ``retries`` times; anything else is raised as it is. Between two attempts, after the pause, it asks whether the
    play that started the module is gone (``PlayWatch`` of dedup_pg: parent process changed, or the session of the
    play's pg_run_lock holder left) and raises ``PlayGone`` instead of trying again: a killed play's module must not
    go on changing tables behind a re-run or a rollback. Out of attempts: ``LockRetriesExhausted``.

``RETRYABLE`` - the one set of retried SQLSTATEs:
    55P03 lock_not_available   lock_timeout expired (also the snapshot guard of sql/migrate_table.sql.j2, which
                               raises it while sessions with a snapshot older than the migration are around);
    40P01 deadlock_detected    the server aborted our transaction to break a deadlock, the other side went on;
    40001 serialization_failure  a REPEATABLE READ/SERIALIZABLE conflict (no caller runs one now; retried because
                               it means the same thing: roll back whole, try again).
    Not retried: 57014 query_canceled (statement_timeout, or pg_cancel_backend by an administrator: a statement too
    slow once is as slow the next time, and a DBA's cancel means stop), connection loss (57P*, 08*), and the rest.
    Retrying is safe only because every caller's attempt is all-or-nothing: one transaction, rolled back before the
    retry; or (CREATE INDEX CONCURRENTLY, which runs outside a transaction) a statement whose INVALID leftover the
    caller's ``before_retry`` drops. A caller whose work is not like that must not use this.

``lock_sessions(cur, table_oid)`` and ``describe_sessions(sessions)``
    the sessions holding or waiting for locks on a table, one dict each (pid, user, application, state, the lock
    modes held / waited for, query start, transaction start and age, wait event, query), and the one text every
    message uses for them: ``pid 123 (user app, application psql, idle in transaction, holds AccessShareLock,
    query since 2026-11-30T10:00:00Z, transaction open 75 s, waiting on Client:ClientRead): SELECT ...``.
    ``lock_failure_message()`` is the one sentence for "out of attempts".

Pure Python but for the two catalog look-ups; no string-built SQL.
"""

from __future__ import annotations

import time

from ansible.module_utils.dedup_pg import PlayWatch, utc_iso  # noqa: F401  (PlayWatch re-exported for callers)

try:
    import psycopg2
except ImportError:  # pragma: no cover - exercised only on hosts without psycopg2
    psycopg2 = None

RETRYABLE = {
    "55P03": "lock_not_available",
    "40P01": "deadlock_detected",
    "40001": "serialization_failure",
}
NONE_VISIBLE = "none visible now (they may have finished)"


class PlayGone(Exception):
    """The play that started the module is gone; raised between two attempts (``attempts`` were made)."""

    def __init__(self, attempts):
        super().__init__("the play that started this module is gone (stopped after %d attempt(s))" % attempts)
        self.attempts = attempts


class LockRetriesExhausted(Exception):
    """Every attempt failed with a retryable error; ``error`` is the last one (also the ``__cause__``)."""

    def __init__(self, attempts, error):
        super().__init__("%d attempt(s), last error: %s" % (attempts, error_line(error)))
        self.attempts = attempts
        self.error = error


def sqlstate(exc):
    """The SQLSTATE of a psycopg2 error (None for anything else)."""
    return getattr(exc, "pgcode", None)


def is_retryable(exc):
    """Whether a failed attempt is retried (see RETRYABLE; statement_timeout/cancel 57014 is not)."""
    return sqlstate(exc) in RETRYABLE


def error_line(exc):
    """The first line of a driver error (its message, without the CONTEXT/HINT lines)."""
    text = (getattr(exc, "pgerror", None) or str(exc) or type(exc).__name__).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rollback(conn):
    """End a failed transaction (no-op outside one, or once the connection is gone)."""
    if conn is None or conn.closed or conn.autocommit:
        return
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001 - a broken connection: the caller's error says so
        pass


def play_gone(conn, watch):
    """Whether the play that started the module is gone (``watch``: a PlayWatch or None). Runs outside any
    transaction and leaves the connection's autocommit as it found it; False when it cannot be told."""
    if watch is None:
        return False
    if conn is None or conn.closed:
        return False
    auto = conn.autocommit
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            return bool(watch.gone(cur))
    except Exception:  # noqa: BLE001 - if we cannot tell, go on as before
        return False
    finally:
        if not conn.closed:
            conn.autocommit = auto


def with_lock_retries(conn, attempt, retries, delay, watch=None, before_retry=None, sleep=time.sleep):
    """Run ``attempt(n)`` until it returns; return ``(its result, attempts made)``.

    A failed attempt's transaction is rolled back. A retryable error (RETRYABLE) is retried ``retries`` times at
    most, ``delay`` seconds apart: ``before_retry(n, exc)`` runs first (show the wait, drop a leftover), then the
    pause, then the play check (``watch``), which raises PlayGone. Out of attempts: LockRetriesExhausted from the
    last error. Any other error propagates unchanged (after the rollback)."""
    number = 0
    while True:
        number += 1
        try:
            return attempt(number), number
        except Exception as exc:
            _rollback(conn)
            if not is_retryable(exc):
                raise
            if number > max(0, int(retries)):
                raise LockRetriesExhausted(number, exc) from exc
            if before_retry is not None:
                before_retry(number, exc)
            sleep(max(0.0, float(delay)))
            if play_gone(conn, watch):
                raise PlayGone(number) from exc


# --------------------------------------------------------------------------- who holds the lock

LOCK_SESSIONS_SQL = (
    "SELECT a.pid, a.usename::text, a.application_name, a.state, "
    "string_agg(DISTINCT l.mode, ', ' ORDER BY l.mode) FILTER (WHERE l.granted), "
    "string_agg(DISTINCT l.mode, ', ' ORDER BY l.mode) FILTER (WHERE NOT l.granted), "
    "a.query_start, a.xact_start, extract(epoch FROM now() - a.xact_start)::int, now() - a.xact_start, "
    "a.wait_event_type, a.wait_event, "
    "left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 200) "
    "FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.relation = %s AND l.pid <> pg_catalog.pg_backend_pid() AND (%s OR a.xact_start IS NOT NULL) "
    "GROUP BY a.pid, a.usename, a.application_name, a.state, a.query_start, a.xact_start, a.wait_event_type, "
    "a.wait_event, a.query ORDER BY a.pid"
)


def lock_sessions(cur, table_oid, in_transaction_only=False):
    """Sessions (but ours) holding or waiting for locks on the table, one dict per session.

    Keys: pid, user, application, state; mode (the modes held, else those waited for), granted (holds every lock
    it asked for), holds (modes granted, or None), waiting_for (modes not granted, or None); query_start and
    xact_start (ISO 8601 UTC), xact_seconds, xact_age (interval text); wait_event ("type:event" or None); query
    (first 200 characters, one line); description (``describe_session``). ``in_transaction_only`` leaves out
    sessions without an open transaction."""
    cur.execute(LOCK_SESSIONS_SQL, (table_oid, not in_transaction_only))
    out = []
    for (pid, user, app, state, held, waited, query_start, xact_start, xact_seconds, xact_age, wait_type,
         wait_event, query) in cur.fetchall():
        session = {
            "pid": pid, "user": user, "application": app or "", "state": state, "mode": held or waited or "",
            "granted": waited is None, "holds": held, "waiting_for": waited, "query_start": utc_iso(query_start),
            "xact_start": utc_iso(xact_start), "xact_seconds": xact_seconds,
            "xact_age": str(xact_age) if xact_age is not None else None,
            "wait_event": "%s:%s" % (wait_type, wait_event) if wait_type else None, "query": query,
        }
        session["description"] = describe_session(session)
        out.append(session)
    return out


def describe_session(s):
    """The one text for a session in the way: ``pid N (user, application, state, locks, times, wait): query``."""
    parts = ["user %s" % s.get("user"), "application %s" % (s.get("application") or "-"), s.get("state") or "?"]
    held = s.get("holds", s.get("mode") if s.get("granted", True) else None)
    if held:
        parts.append("holds %s" % held)
    if s.get("waiting_for"):
        parts.append("waits for %s" % s["waiting_for"])
    if s.get("query_start"):
        parts.append("query since %s" % s["query_start"])
    if s.get("xact_seconds") is not None:
        parts.append("transaction open %s s" % s["xact_seconds"])
    if s.get("wait_event"):
        parts.append("waiting on %s" % s["wait_event"])
    return "pid %s (%s): %s" % (s.get("pid"), ", ".join(parts), s.get("query") or "-")


def describe_sessions(sessions, none=NONE_VISIBLE):
    """Every session in the way, ``; `` apart (``none`` when there is none)."""
    return "; ".join(describe_session(s) for s in sessions) or none


def sessions_in_the_way(conn, table_oid):
    """lock_sessions() for a failure message, on its own autocommit look-up; [] when it cannot be read."""
    if conn is None or conn.closed:
        return []
    auto = conn.autocommit
    try:
        _rollback(conn)
        conn.autocommit = True
        with conn.cursor() as cur:
            return lock_sessions(cur, table_oid)
    except Exception:  # noqa: BLE001 - best effort for the message
        return []
    finally:
        if not conn.closed:
            conn.autocommit = auto


def lock_failure_message(what, attempts, error, sessions, lock_timeout=None, delay=None, outcome="", advice=""):
    """The one sentence for "out of attempts": what could not be locked, how hard it was tried, the last error,
    what that means for the data (``outcome``), the sessions in the way, what to do (``advice``)."""
    how = []
    if lock_timeout:
        how.append("lock_timeout %s each" % lock_timeout)
    if delay is not None:
        how.append("%g s apart" % float(delay))
    how.append("last error: %s" % (error_line(error) if isinstance(error, BaseException) else error))
    msg = "could not lock %s after %d attempts (%s)" % (what, attempts, "; ".join(how))
    if outcome:
        msg += "; " + outcome
    msg += ". Sessions in the way: %s." % describe_sessions(sessions)
    if advice:
        msg += " " + advice
    return msg
