"""Online mode (dedup_mode=online): the pg_online_dedup module on small tables, then the whole
deploy_dedup.yml on the lab while the v1 ETL and a row-by-row inserter keep writing.

Real parts only: the harness cluster, the real module code, the real ansible-playbook, the real v1 ETL.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import psycopg2
import pytest
from test_faults import accounted

from harness import wait_for
from modkit import pg_args, run_module

LEDGER_SQL = """
CREATE SCHEMA dedup_rollout;
CREATE TABLE dedup_rollout.runs (run_id text PRIMARY KEY, kind text NOT NULL, status text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE dedup_rollout.table_runs (
    run_id text NOT NULL REFERENCES dedup_rollout.runs (run_id), schema_name text NOT NULL,
    table_name text NOT NULL, natural_key text[] NOT NULL, keep text NOT NULL, order_by text NOT NULL,
    status text NOT NULL, strategy text, backup_mode text, backup_table text, rows_before bigint,
    rows_kept bigint, rows_removed bigint, keep_fingerprint text, size_before bigint, size_after bigint,
    constraint_name text, constraint_created boolean NOT NULL DEFAULT false, started_at timestamptz,
    finished_at timestamptz, seconds numeric, PRIMARY KEY (run_id, schema_name, table_name));
INSERT INTO dedup_rollout.runs VALUES ('r1', 'deploy', 'running');
"""

SMALL_SQL = """
CREATE SCHEMA s;
CREATE TABLE s.items (id bigserial PRIMARY KEY, k1 int NOT NULL, k2 text, payload text,
                      created_at timestamptz NOT NULL DEFAULT now());
-- 200 keys (k2 NULL for 10 of them), 1 + (k1 % 7) rows each, inserted round-robin so ids interleave
INSERT INTO s.items (k1, k2, payload)
SELECT k, CASE WHEN k % 20 = 0 THEN NULL ELSE 'k' || k END, 'copy ' || c
FROM generate_series(1, 6) c, generate_series(1, 200) k WHERE c <= 1 + k % 7 ORDER BY c, k;
"""


def _db(pg, fresh_db, extra=""):
    conn = pg.connect(fresh_db)
    with conn.cursor() as cur:
        cur.execute(LEDGER_SQL + SMALL_SQL + extra)
    return conn


def _args(pg, db, **kw):
    args = pg_args(pg, db, schema="s", table="items", natural_key=["k1", "k2"], run_id="r1",
                   backup_table="items__r1", nulls_not_distinct=True, batch_rows=50, batch_pause=0,
                   vacuum_every=3, retry_delay=0.2)
    args.update(kw)
    return args


def _q(conn, q, params=None):
    with conn.cursor() as cur:
        cur.execute(q, params)
        return cur.fetchall()


def test_module_dedups_keeps_oldest_backs_up_and_constrains(pg, fresh_db):
    conn = _db(pg, fresh_db)
    expected = _q(conn, "SELECT k1, k2, min(id) FROM s.items GROUP BY 1, 2 ORDER BY 1, 2")
    all_ids = {r[0] for r in _q(conn, "SELECT id FROM s.items")}

    check = run_module("pg_online_dedup", _args(pg, fresh_db), check=True)
    assert check["changed"] and check["action"] == "would_deduplicate_online"
    assert _q(conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 's.items'::regclass AND NOT tgisinternal") == [
        (0,)]

    res = run_module("pg_online_dedup", _args(pg, fresh_db))
    assert not res.get("failed"), res
    assert res["changed"] and res["action"] == "deduplicated_online"
    assert res["batches"] >= len(all_ids) // 50
    assert _q(conn, "SELECT k1, k2, id FROM s.items ORDER BY 1, 2") == expected
    backup_ids = {r[0] for r in _q(conn, "SELECT id FROM dedup_rollout.items__r1")}
    assert backup_ids | {r[2] for r in expected} == all_ids and not backup_ids & {r[2] for r in expected}
    assert _q(conn, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                    "'s.items'::regclass AND contype = 'u'") == [("items_k1_k2_key",
                                                                  "UNIQUE NULLS NOT DISTINCT (k1, k2)")]
    # guard, its function and the helper index are gone
    assert _q(conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 's.items'::regclass AND NOT tgisinternal") == [
        (0,)]
    assert _q(conn, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'dedup_rollout'::regnamespace") == [(0,)]
    assert _q(conn, "SELECT count(*) FROM pg_class WHERE relname = 'items_dedup_online_idx'") == [(0,)]
    led = _q(conn, "SELECT status, strategy, rows_before, rows_kept, rows_removed, constraint_created "
                   "FROM dedup_rollout.table_runs")
    assert led == [("deduplicated", "online", len(all_ids), len(expected), len(backup_ids), True)]
    assert res["size_after"]["total_bytes"] > 0

    again = run_module("pg_online_dedup", _args(pg, fresh_db))
    assert not again.get("failed") and not again["changed"] and again["action"] == "none"
    conn.close()


def _repack_client(pg) -> str | None:
    major = pg.version
    for cand in (shutil.which("pg_repack"), f"/usr/lib/postgresql/{major}/bin/pg_repack",
                 f"/usr/pgsql-{major}/bin/pg_repack"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def test_pg_repack_gives_the_space_back_when_the_server_has_it(pg, fresh_db):
    """With the extension in the database and its client on the db host (bootstrap installs
    postgresql-<ver>-repack), online mode rewrites the table with pg_repack: the space comes back.
    Without the extension it says why it did not, and the free space stays inside the table."""
    if not _repack_client(pg):
        pytest.fail("pg_repack is not installed: scripts/bootstrap.sh installs postgresql-<ver>-repack", pytrace=False)
    extra = """
CREATE TABLE s."Big Items" (id bigserial PRIMARY KEY, k1 int NOT NULL, payload text);
INSERT INTO s."Big Items" (k1, payload) SELECT g % 500, repeat('x', 200) FROM generate_series(1, 40000) g;
"""
    conn = _db(pg, fresh_db, extra)
    before = _q(conn, """SELECT pg_total_relation_size('s."Big Items"')""")[0][0]
    # Without the extension: not used, and the reason is given.
    res = run_module("pg_online_dedup", _args(pg, fresh_db, table="Big Items", natural_key=["k1"],
                                              backup_table="big__r1", batch_rows=5000))
    assert not res.get("failed"), res
    assert res["repacked"] is False and "CREATE EXTENSION pg_repack" in res["repack_skipped"]
    unrepacked = _q(conn, """SELECT pg_total_relation_size('s."Big Items"')""")[0][0]

    # The same again on a fresh copy, with the extension.
    _q(conn, """CREATE EXTENSION pg_repack; DROP TABLE s."Big Items"; DROP TABLE dedup_rollout.big__r1;
               DELETE FROM dedup_rollout.table_runs; SELECT 1""")
    with conn.cursor() as cur:
        cur.execute(extra)
    res = run_module("pg_online_dedup", _args(pg, fresh_db, table="Big Items", natural_key=["k1"],
                                              backup_table="big__r1", batch_rows=5000))
    assert not res.get("failed"), res
    assert res["repacked"] is True, res.get("repack_skipped") or res.get("warnings")
    after = _q(conn, """SELECT pg_total_relation_size('s."Big Items"')""")[0][0]
    assert _q(conn, 'SELECT count(*), count(DISTINCT k1) FROM s."Big Items"') == [(500, 500)]
    assert _q(conn, "SELECT count(*) FROM dedup_rollout.big__r1") == [(39500,)]
    assert after < unrepacked / 4 and after < before / 4, (before, unrepacked, after)
    assert _q(conn, """SELECT count(*) FROM pg_constraint WHERE conrelid = 's."Big Items"'::regclass
                       AND contype = 'u'""") == [(1,)]
    print(f"\nsize before {before}, after without pg_repack {unrepacked}, with pg_repack {after}")
    conn.close()


def test_guard_skips_existing_keys_and_refuses_key_moves(pg, fresh_db):
    """The guard alone (installed by an interrupted run): INSERT of an existing key is skipped, even within one
    statement; an UPDATE onto an existing key fails; a re-run resumes and finishes."""
    conn = _db(pg, fresh_db)
    from ansible.module_utils.dedup_online import OnlineDedup  # noqa: PLC0415 (modkit sets the path)

    class Stop(Exception):
        pass

    class M:
        check_mode = False
        params = None

        def warn(self, msg):
            pass

    m = M()
    base = {"schema": "s", "table": "items", "natural_key": ["k1", "k2"], "keep": "oldest", "order_by": None,
            "run_id": "r1", "backup_schema": "dedup_rollout", "backup_table": "items__r1", "backup_mode": "table",
            "constraint_name": None, "nulls_not_distinct": True, "batch_rows": 50, "batch_pause": 0,
            "vacuum_every": 0, "lock_buckets": 16, "lock_timeout": "500ms", "retries": 3, "retry_delay": 0.1,
            "work_mem": "4MB", "maintenance_work_mem": "64MB", "repack": "never", "repack_wait_timeout": 1}
    m.params = dict(base, **pg_args(pg, fresh_db))
    od = OnlineDedup(m)
    orig = od.build_keep

    def interrupted():
        orig()
        raise Stop()

    od.build_keep = interrupted
    with pytest.raises(Stop):
        od.run(lambda: pg.connect(fresh_db))
    before = _q(conn, "SELECT count(*) FROM s.items")[0][0]
    with conn.cursor() as cur:
        cur.execute("INSERT INTO s.items (k1, k2, payload) VALUES (1, 'k1', 'dup'), (1, 'k1', 'dup2'), "
                    "(5000, 'new', 'a'), (5000, 'new', 'b'), (20, NULL, 'null dup'), (5001, NULL, 'n1'), "
                    "(5001, NULL, 'n2')")
        assert cur.rowcount == 2
    assert _q(conn, "SELECT count(*) FROM s.items")[0][0] == before + 2
    with pytest.raises(psycopg2.errors.UniqueViolation):
        with conn.cursor() as cur:
            cur.execute("UPDATE s.items SET k1 = 1, k2 = 'k1' WHERE k1 = 5000")
    with conn.cursor() as cur:  # same key written back: allowed
        cur.execute("UPDATE s.items SET k1 = k1, payload = 'x' WHERE k1 = 5000")
        assert cur.rowcount == 1
    res = run_module("pg_online_dedup", _args(pg, fresh_db))
    assert not res.get("failed"), res
    assert res["action"] == "deduplicated_online"
    assert _q(conn, "SELECT count(*) FROM (SELECT 1 FROM s.items GROUP BY k1, k2 HAVING count(*) > 1) d") == [(0,)]
    assert _q(conn, "SELECT payload FROM s.items WHERE k1 = 5000") == [("x",)]
    conn.close()


def test_concurrent_inserters_never_duplicate_and_never_stall(pg, fresh_db):
    """Four threads insert overlapping new and old keys row by row during the run; no duplicate, every returned
    id ends in the table or the backup, and the longest single statement stays short."""
    conn = _db(pg, fresh_db)
    with conn.cursor() as cur:  # a bigger table so that the run lasts a while
        cur.execute("INSERT INTO s.items (k1, k2, payload) SELECT k % 300, 'k' || (k % 300), 'bulk' "
                    "FROM generate_series(1, 60000) k")
    stop = threading.Event()
    stalls, ids, errors = [], set(), []

    def writer(seed):
        c = pg.connect(fresh_db)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                k = 10000 + (i * 7 + seed) % 400 if i % 2 else (i % 300)
                t0 = time.monotonic()
                try:
                    with c.cursor() as cur:
                        cur.execute("INSERT INTO s.items (k1, k2, payload) VALUES (%s, %s, 'w') "
                                    "ON CONFLICT DO NOTHING RETURNING id", (k, f"k{k}"))
                        row = cur.fetchone()
                    if row:
                        ids.add(row[0])
                except psycopg2.Error as exc:  # deadlocks would show here
                    errors.append(str(exc))
                stalls.append(time.monotonic() - t0)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        res = run_module("pg_online_dedup", _args(pg, fresh_db, batch_rows=2000, batch_pause=0.01))
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not res.get("failed"), res
    assert not errors, errors[:3]
    assert _q(conn, "SELECT count(*) FROM (SELECT 1 FROM s.items GROUP BY k1, k2 HAVING count(*) > 1) d") == [(0,)]
    present = {r[0] for r in _q(conn, "SELECT id FROM s.items UNION ALL SELECT id FROM dedup_rollout.items__r1")}
    assert ids <= present
    print(f"online module: {len(stalls)} writer statements, longest {max(stalls):.3f} s, "
          f"run {res['seconds']:.2f} s, {res['batches']} batches")
    assert max(stalls) < 1.0
    conn.close()


# --------------------------------------------------------------------------- the whole deploy on the lab


class Writers:
    """The v1 ETL in a loop (as the ETL user, like cron) and a row-by-row inserter into task_requirements that
    times every statement. Every other statement of the inserter is a new key, also while the smoke test runs:
    online, tables grow by business data meanwhile, and that must not be held against the ETL (issue 16)."""

    TABLE = "task_requirements"

    def __init__(self, lab):
        self.lab = lab
        self.stop = threading.Event()
        self.stalls: list[float] = []
        self.ids: set[int] = set()
        self.keys: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self.etl_runs: list[int] = []
        self.etl_seconds: list[float] = []
        self.threads = [threading.Thread(target=self._etl), threading.Thread(target=self._inserter)]

    def _etl(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            run = self.lab.run_etl("nashville", "tasks", check=False)
            self.etl_runs.append(run.rc)
            self.etl_seconds.append(time.monotonic() - t0)
            if run.rc:
                self.errors.append(f"etl: {run.stderr[-300:]}")
            self.stop.wait(0.5)

    def _inserter(self):
        c = self.lab.conn()
        with c.cursor() as cur:
            cur.execute("SELECT id FROM breezeway.tasks ORDER BY id LIMIT 50")
            tasks = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT min(id) FROM breezeway.task_requirements GROUP BY task_pk, requirement_id LIMIT 200")
            old = [r[0] for r in cur.fetchall()]
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                t0 = time.monotonic()
                try:
                    with c.cursor() as cur:
                        # An existing key, sent again with the same values (as the ETL); every other statement a
                        # new key, also while the smoke test runs (business data arriving: issue 16).
                        if i % 2:
                            cur.execute("INSERT INTO breezeway.task_requirements (task_pk, requirement_id, name, "
                                        "quantity, is_done, cost, details, due_at) SELECT task_pk, requirement_id, "
                                        "name, quantity, is_done, cost, details, due_at FROM "
                                        "breezeway.task_requirements WHERE id = %s "
                                        "ON CONFLICT DO NOTHING RETURNING id, task_pk, requirement_id",
                                        (old[i % len(old)],))
                        else:  # a new key
                            cur.execute("INSERT INTO breezeway.task_requirements (task_pk, requirement_id, name) "
                                        "VALUES (%s, %s, 'inserter') ON CONFLICT DO NOTHING "
                                        "RETURNING id, task_pk, requirement_id", (tasks[i % len(tasks)], 900000 + i))
                        row = cur.fetchone()
                    if row:
                        self.ids.add(row[0])
                        self.keys.add((row[1], row[2]))
                except psycopg2.Error as exc:
                    self.errors.append(f"inserter: {exc}")
                self.stalls.append(time.monotonic() - t0)
                time.sleep(0.01)
        finally:
            c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _kept(lab) -> dict[str, dict[tuple, int]]:
    out = {}
    for t in lab.tables:
        cols = lab.natural_keys[t]
        rows = lab.query(psycopg2.sql.SQL("SELECT {k}, min(id) FROM {t} GROUP BY {k}").format(
            k=psycopg2.sql.SQL(", ").join(map(psycopg2.sql.Identifier, cols)),
            t=psycopg2.sql.Identifier(lab.schema, t)))
        out[t] = {tuple(r[:-1]): r[-1] for r in rows}
    return out


def test_deploy_online_while_the_etl_and_an_inserter_write(lab):
    before = _kept(lab)
    dups_before = lab.duplicates()
    assert sum(dups_before.values()) > 0
    cron_before = lab.crontab()
    t0 = time.monotonic()
    with Writers(lab) as w:
        time.sleep(1.0)
        res = lab.playbook("playbooks/deploy_dedup.yml", "-e", "dedup_mode=online",
                           "-e", "migrate_online_batch_rows=2000", "-e", "migrate_online_batch_pause=0.02")
        time.sleep(0.5)
    seconds = time.monotonic() - t0
    assert res.rc == 0 and not res.failed(), res.output[-6000:]
    assert not w.errors, w.errors[:5]
    assert w.etl_runs and all(rc == 0 for rc in w.etl_runs)
    assert "etl_smoke: passed, zero duplicates after the last run (online mode" in " ".join(res.output.split())
    # the ETL cron was never paused
    assert lab.crontab() == cron_before

    # same end state as offline mode: no duplicates, the oldest row of every key kept, one constraint each
    assert lab.duplicates() == dict.fromkeys(lab.tables, 0)
    after = _kept(lab)
    for t in lab.tables:
        for key, kid in before[t].items():
            assert after[t].get(key) == kid, (t, key)
    cons = dict(lab.query("SELECT c.relname::text, string_agg(pg_get_constraintdef(k.oid), '; ') "
                          "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid WHERE k.contype = 'u' "
                          "AND k.connamespace = 'breezeway'::regnamespace GROUP BY 1"))
    for t in lab.tables:
        want = "UNIQUE ({})".format(", ".join(lab.natural_keys[t]))
        assert cons.get(t) == want, (t, cons)

    # nothing lost: every row the inserter wrote is in the table or the backup, every key it sent is there
    ledger = {r[0]: r for r in lab.query(
        "SELECT table_name, status, strategy, backup_table, rows_removed FROM dedup_rollout.table_runs")}
    assert ledger[Writers.TABLE][1:3] == ("constrained", "online")
    backup = psycopg2.sql.Identifier("dedup_rollout", ledger[Writers.TABLE][3])
    present = {r[0] for r in lab.query(psycopg2.sql.SQL(
        "SELECT id FROM breezeway.task_requirements UNION ALL SELECT id FROM {}").format(backup))}
    assert w.ids <= present
    keys = set(lab.query("SELECT task_pk, requirement_id FROM breezeway.task_requirements"))
    assert w.keys <= keys
    for t, d in dups_before.items():
        if d:  # the ETL added more before the guard was in place
            assert ledger[t][4] >= d, (t, ledger[t], d)
    print(f"\nonline deploy on the lab: {seconds:.1f} s with writers; inserter {len(w.stalls)} statements, "
          f"longest stall {max(w.stalls):.3f} s; ETL runs {len(w.etl_runs)} (longest {max(w.etl_seconds):.1f} s)")
    assert max(w.stalls) < 1.0


@pytest.mark.slow
def test_online_deploy_killed_then_backend_terminated_then_resumes(lab):
    """Faults in online mode: the play SIGKILLed mid-table, then the module's backend terminated mid-table;
    each time nothing is lost and the ETL cron is never touched; a plain re-run finishes like an
    uninterrupted online deploy."""
    original = {t: {r[0] for r in lab.query(psycopg2.sql.SQL("SELECT x::text FROM {} x").format(
        psycopg2.sql.Identifier(lab.schema, t)))} for t in lab.tables}
    before = _kept(lab)
    cron_before = lab.crontab()
    slow = {"dedup_mode": "online", "migrate_online_batch_rows": 300, "migrate_online_batch_pause": 0.3}

    killed, out = lab.run_killed_at(
        "playbooks/deploy_dedup.yml",
        "TASK [migrate : Deduplicate and constrain each table while its writers keep running]", 6.0, **slow)
    assert killed, out[-4000:]
    lab.settle()
    assert lab.crontab() == cron_before, "online mode never pauses the ETL"
    accounted(lab, original, disjoint=False)
    assert sum(lab.duplicates().values()) > 0, "the kill landed before the end of the work"

    proc = lab.start_playbook("playbooks/deploy_dedup.yml", **slow)

    def terminate_online_backend() -> bool:
        """Terminate the online module's backend mid-table (busy, or idle in a pause between two batches; each
        table has its own session: retry when the one found has just ended)."""
        if proc.poll() is not None:
            raise AssertionError("the re-run ended before its online module could be hit:\n"
                                 + proc.communicate()[0][-5000:])
        rows = lab.query("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND "
                         "application_name = 'dedup-rollout/pg_online_dedup'")
        return bool(rows) and lab.pg.scalar("SELECT pg_terminate_backend(%s)", params=(rows[0][0],)) is True

    wait_for(terminate_online_backend, timeout=300, interval=0.2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-4000:]
    assert "Traceback" not in out and lab.password not in out
    lab.settle()
    assert lab.crontab() == cron_before
    accounted(lab, original, disjoint=False)

    res = lab.playbook("playbooks/deploy_dedup.yml", "-e", "dedup_mode=online")
    assert res.rc == 0, res.output[-5000:]
    assert lab.duplicates() == dict.fromkeys(lab.tables, 0)
    after = _kept(lab)
    for t in lab.tables:
        assert after[t] == before[t], t
    accounted(lab, original, disjoint=False)
    assert lab.crontab() == cron_before
    again = lab.playbook("playbooks/deploy_dedup.yml", "-e", "dedup_mode=online")
    assert again.rc == 0 and again.changed() == 0, again.output[-3000:]
