"""Progress lines of long work (issue 18): pg_dump and the UNIQUE index build print where they are.

Made long on purpose, on real parts: the dump waits behind a test session's ACCESS EXCLUSIVE lock on a table that
is not deduplicated (pg_dump locks every table it dumps), inside a real deploy of the lab; the lab database (about
14 MB) is over the 5MB threshold given and its tables are not, so only the dump runs in the background. The index
build (``CREATE UNIQUE INDEX CONCURRENTLY``) waits in its "waiting for writers" phase for a test transaction that
inserted a row. The lock / transaction is let go once the server has shown the wait for a few seconds.
"""

from __future__ import annotations

import re
import threading
import time

import psycopg2
from psycopg2 import sql

from harness import REPO, run_playbook

DEPLOY = REPO / "deploy_dedup.yml"


def pg_dsn(pg, db: str) -> dict:
    return pg.dsn(db)  # the superuser: sees every session's wait


def hold_until(conn, dsn: dict, pred, seconds: float, limit: float = 240) -> threading.Thread:
    """Commit ``conn``'s transaction (ending its lock) once ``pred(cur)`` has held for ``seconds``, or after ``limit``;
    ``dsn`` connects the watching session."""
    def run():
        since, end = None, time.monotonic() + limit
        watch = psycopg2.connect(**dsn)
        watch.autocommit = True
        try:
            while time.monotonic() < end:
                with watch.cursor() as cur:
                    ok = pred(cur)
                if ok and since is None:
                    since = time.monotonic()
                if since is not None and time.monotonic() - since >= seconds:
                    break
                time.sleep(0.2)
        finally:
            watch.close()
        conn.commit()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_dump_waiting_behind_a_lock_prints_progress_lines_and_the_deploy_completes(lab):
    owner = lab.conn()
    with owner.cursor() as cur:
        cur.execute("CREATE TABLE breezeway.progress_blocker (id int)")
    owner.close()
    locker = lab.conn(autocommit=False)
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE breezeway.progress_blocker IN ACCESS EXCLUSIVE MODE")

    def dump_waits(cur):
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dedup-rollout/pg_dump' "
                    "AND wait_event_type = 'Lock'")
        return cur.fetchone()[0] > 0

    releaser = hold_until(locker, pg_dsn(lab.pg, lab.dbname), dump_waits, seconds=4)
    res = lab.playbook(DEPLOY, extra_vars={"dedup_progress_min_size": "5MB", "dedup_progress_interval": 1})
    releaser.join(timeout=5)
    locker.close()
    assert res.rc == 0, res.output[-5000:]
    lines = re.findall(rf"^\[lab-db\] pg_dump of {re.escape(lab.dbname)}: .*$", res.stdout, re.M)
    assert lines, res.output[-5000:]
    assert any("written" in line and "estimated" in line and "waiting for a lock (relation) held by pid(s)" in line
               for line in lines), lines
    assert all(v == 0 for v in lab.duplicates().values()), "the deploy did not complete"


def test_a_unique_index_build_prints_its_phase(pg, fresh_db, tmp_path):
    admin = pg.connect(fresh_db)
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE public.big (id serial PRIMARY KEY, k int NOT NULL)")
        cur.execute("INSERT INTO public.big (k) SELECT g FROM generate_series(1, 2000) g")
    admin.close()
    writer = pg.connect(fresh_db, autocommit=False)  # an open transaction that wrote: CIC waits for it
    with writer.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO public.big (k) VALUES (100000)"))

    def build_waits(cur):
        cur.execute("SELECT count(*) FROM pg_stat_progress_create_index WHERE phase LIKE 'waiting for writers%'")
        return cur.fetchone()[0] > 0

    releaser = hold_until(writer, pg_dsn(pg, fresh_db), build_waits, seconds=3.5)
    play = tmp_path / "index.yml"
    play.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Build the constraint concurrently
      pg_unique_constraint:
        login_host: 127.0.0.1
        login_port: {pg.port}
        login_db: {fresh_db}
        login_user: {pg.superuser}
        login_password: "{{{{ pw }}}}"
        schema: public
        table: big
        columns: [k]
        concurrently: true
        lock_timeout: 60s
""")
    import sys  # noqa: PLC0415

    res = run_playbook(play, "-i", "localhost,", "-c", "local",
                       extra_vars={"pw": pg.password, "ansible_python_interpreter": sys.executable,
                                   "dedup_progress_interval": 1, "dedup_progress_min_size": "0"})
    releaser.join(timeout=5)
    writer.close()
    assert res.rc == 0, res.output[-4000:]
    assert re.search(r"^\[localhost\] public\.big: UNIQUE index build: waiting for writers before build",
                     res.stdout, re.M), res.output[-4000:]
    assert pg.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.big'::regclass AND contype = 'u'",
                     fresh_db) == 1


def test_the_reader_measures_a_partial_dump_and_says_when_nothing_runs(pg, fresh_db, tmp_path):
    from modkit import pg_args, run_module  # noqa: PLC0415

    final = tmp_path / "db.dump"
    (tmp_path / "db.dump.partial-20261130T000000Z-42").write_bytes(b"x" * 3000)
    res = run_module("pg_migrate_progress", pg_args(pg, fresh_db, kind="dump", path=str(final),
                                                     estimate_bytes=6000, wait=0))
    assert res["running"] and res["bytes_written"] == 3000, res
    assert "reading the archive back whole" in res["msg"], res  # no pg_dump session: it is the read-back
    for kind in ("index", "restore"):
        res = run_module("pg_migrate_progress", pg_args(pg, fresh_db, kind=kind, schema="public", table="t", wait=0))
        assert not res.get("failed") and res["running"] is False, res
    res = run_module("pg_migrate_progress", pg_args(pg, fresh_db, kind="dump", wait=0))
    assert res.get("failed") and "needs path" in res["msg"], res


def test_a_restore_in_slices_says_how_many_rows_are_back(lab):
    """A rollback puts the removed rows back in slices (restore_batch_rows) within the table's one transaction;
    the progress line counts them. Made slow on purpose: a NOT VALID CHECK calling pg_sleep on every new row."""
    counts = lab.counts()
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-4000:]
    lab.admin_conn().cursor().execute("""
        CREATE FUNCTION public.slow_ok() RETURNS boolean LANGUAGE sql AS $$ SELECT pg_sleep(0.0003) IS NOT NULL $$;
        ALTER TABLE breezeway.task_requirements ADD CONSTRAINT slow CHECK (public.slow_ok()) NOT VALID""")
    res = lab.playbook(REPO / "rollback.yml", extra_vars={
        "dedup_progress_interval": 1, "dedup_progress_min_rows": 0, "restore_batch_rows": 3000})
    assert res.rc == 0, res.output[-4000:]
    back = [(int(a), int(b)) for a, b in re.findall(
        r"^\[lab-db\] breezeway\.task_requirements: putting back the removed rows: (\d+) of (\d+) back \(\d+%\)",
        res.stdout, re.M)]
    assert back and any(0 < a < b for a, b in back), res.output[-4000:]
    assert back[-1][1] == counts["task_requirements"] - lab.unique_counts()["task_requirements"]
    assert lab.counts() == counts
