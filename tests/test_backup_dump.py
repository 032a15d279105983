"""A dump is the backup only when it is complete (issue 14, part 2), on real parts.

The module (pg_dump_backup) against an empty database of the harness cluster: a garbage file at the final
path is set aside, partials of killed runs are removed, the directory format's sha256 is the ledger's formula,
check mode changes nothing, a permission error is called one. Then one lab chain through the real playbook:
the play SIGKILLed while pg_dump is blocked writing its partial file, the re-run (a garbage file waiting at the
final path) stopped right after its verified dump, rows written to a table, and the resume that must take a
new dump; both recorded dumps are restored into scratch databases with the real pg_restore.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

from psycopg2 import sql
from test_deploy import DEPLOY, LEDGER, ledger_exists, ledger_tables, snapshot

from harness import wait_for
from modkit import pg_args, run_module

# --------------------------------------------------------------------------- the module


def _small_db(pg, dbname):
    pg.execute("CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY, v text); "
               "INSERT INTO app.items SELECT g, md5(g::text) FROM generate_series(1, 2000) g; "
               "CREATE SCHEMA dedup_rollout; CREATE TABLE dedup_rollout.secret (x int)", dbname)


def _dir_sha256(path: Path) -> str:
    """The ledger's formula for a directory dump, by the shell it always used."""
    out = subprocess.run(["bash", "-c", "set -o pipefail; cd \"$1\" && find . -type f -print0 | sort -z | "
                          "xargs -0 sha256sum | sha256sum | cut -d' ' -f1", "-", str(path)],
                         capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    return out.stdout.strip()


def test_module_sets_aside_garbage_removes_partials_and_verifies(pg, fresh_db, tmp_path):
    _small_db(pg, fresh_db)
    final = tmp_path / "db.dump"
    final.write_bytes(b"not a dump at all")
    partial = tmp_path / "db.dump.partial-20260101T000000Z-1"
    partial.write_bytes(b"PGDMP half")
    args = pg_args(pg, fresh_db, path=str(final), schema="app", tables=["items"], exclude_schema="dedup_rollout")

    check = run_module("pg_dump_backup", args, check=True)
    assert check.get("changed") and not check.get("failed"), check
    assert "would dump" in check["msg"] and "would set aside" in check["msg"] and str(partial) in check["msg"]
    assert final.read_bytes() == b"not a dump at all" and partial.exists(), "check mode changed nothing"

    res = run_module("pg_dump_backup", args)
    assert res.get("changed") and not res.get("failed"), res
    assert res["removed_partials"] == [str(partial)] and not partial.exists()
    assert res["set_aside"] and Path(res["set_aside"]).read_bytes() == b"not a dump at all"
    assert ".unverified-" in res["set_aside"]
    assert "moved aside" in json.dumps(res.get("warnings")), res.get("warnings")
    assert res["sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert res["bytes"] == final.stat().st_size and res["verified_entries"] > 0
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert glob.glob(str(tmp_path / "*.partial-*")) == []
    assert pg.password not in json.dumps(res)
    toc = subprocess.run(["pg_restore", "--list", str(final)], capture_output=True, text=True, check=True).stdout
    assert "TABLE DATA app items" in toc and "dedup_rollout" not in toc

    # The directory format: 0700 dir, 0600 files, the same sha256 as the shell formula of the ledger.
    ddir = tmp_path / "db.dir"
    res = run_module("pg_dump_backup", dict(args, path=str(ddir), format="directory"))
    assert res.get("changed") and not res.get("failed"), res
    assert res["sha256"] == _dir_sha256(ddir)
    assert stat.S_IMODE(ddir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in ddir.iterdir())
    # action=check: the recorded sha256 and the write counters.
    chk = run_module("pg_dump_backup", dict(args, action="check", path=str(ddir), sha256=res["sha256"],
                                            table_writes=res["table_writes"], compare_tables=["items"]))
    assert chk["matches"] and chk["stale"] == [], chk
    pg.execute("INSERT INTO app.items VALUES (0, 'late')", fresh_db)
    chk = wait_for(lambda: (lambda r: r if r["stale"] else None)(run_module(
        "pg_dump_backup", dict(args, action="check", path=str(ddir), sha256="0" * 64,
                               table_writes=res["table_writes"], compare_tables=["items"]))), timeout=20)
    assert not chk["matches"] and chk["stale"][0]["table"] == "items" and "1 rows" in chk["stale"][0]["reason"]


def test_module_names_a_permission_error_and_leaves_no_partial(pg, fresh_db, tmp_path):
    _small_db(pg, fresh_db)
    role, pw = "dumpweak_" + uuid.uuid4().hex[:6], "weak-" + uuid.uuid4().hex[:8]
    admin = pg.connect(fresh_db)
    with admin.cursor() as cur:  # may log in and use the schema, but not read the table
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(pw)))
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(sql.Identifier(role)))
    try:
        final = tmp_path / "weak.dump"
        res = run_module("pg_dump_backup", pg_args(pg, fresh_db, login_user=role, login_password=pw, path=str(final),
                                                   schema="app", tables=["items"]))
        assert res.get("failed"), res
        assert "permission denied" in res["msg"] and "full" not in res["msg"] and "version" not in res["msg"], res
        assert pw not in res["msg"]
        assert list(tmp_path.iterdir()) == [], "the partial dump was removed"
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))
        admin.close()


# --------------------------------------------------------------------------- the playbook, one lab


def _ledger_run(lab, deploy_id: str) -> dict:
    q = sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s").format(sql.Identifier(LEDGER, "runs"))
    return json.loads(lab.query(q, (deploy_id,))[0][0])


def _restore_counts(lab, dump: str) -> tuple[dict[str, set], float]:
    """Restore ``dump`` into a scratch database with the real pg_restore; every row per managed table."""
    scratch = "scratch_" + uuid.uuid4().hex[:10]
    lab.pg.create_database(scratch)
    try:
        t0 = time.monotonic()
        env = {**os.environ, "PGPASSWORD": lab.pg.password}
        p = subprocess.run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "-h", "127.0.0.1",
                            "-p", str(lab.pg.port), "-U", lab.pg.superuser, "-d", scratch, dump],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        took = time.monotonic() - t0
        c = lab.pg.connect(scratch)
        try:
            with c.cursor() as cur:
                out = {}
                for t in lab.tables:
                    cur.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(lab.schema, t)))
                    out[t] = {r[0] for r in cur.fetchall()}
        finally:
            c.close()
        return out, took
    finally:
        lab.pg.drop_database(scratch)


def _pg_dump_waiting(lab) -> bool:
    return bool(lab.pg.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND application_name = 'dedup-rollout/pg_dump' "
        "AND wait_event_type = 'Lock'", lab.dbname, (lab.dbname,)))


def test_dump_killed_while_writing_then_garbage_then_rows_written_before_resume(lab):
    """(a) SIGKILL of the whole play while pg_dump is blocked writing its partial file; (b) a garbage file at
    the final path on the re-run is set aside, not accepted; (c) rows written to a not-yet-migrated table
    before a resume in backup mode dump make a new dump. Every recorded dump restores every original row."""
    original = snapshot(lab)
    counts = {t: len(rows) for t, rows in original.items()}
    assert sum(lab.counts().values()) > sum(counts.values()) / 2

    # --- (a) the kill: a session holds ACCESS EXCLUSIVE on task_tags from the ledger step on (after preflight,
    # which reads every table), so pg_dump blocks right after creating its output file.
    proc = lab.start_playbook(DEPLOY, dedup_backup_mode="dump")
    lines: list[str] = []
    marker = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "TASK [backup : Record the deploy as running" in line:
                marker.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    locker = lab.conn(autocommit=False)
    try:
        assert wait_for(lambda: marker.is_set() or proc.poll() is not None, timeout=300) and marker.is_set(), \
            "".join(lines)[-4000:]
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE breezeway.task_tags IN ACCESS EXCLUSIVE MODE")
        wait_for(lambda: _pg_dump_waiting(lab) and glob.glob(str(lab.backup_dir / "*.partial-*")), timeout=120)
        partial = glob.glob(str(lab.backup_dir / "*.partial-*"))
        assert len(partial) == 1 and not glob.glob(str(lab.backup_dir / "*.dump")), partial
        partial_bytes = os.path.getsize(partial[0])
        lab.kill_run(proc)
        th.join(timeout=10)
        # pg_dump died with the module (it would otherwise go on writing once the lock is released); its backend
        # notices only when the lock is granted and it writes to the closed socket.
        for pattern in (partial[0], "AnsiballZ_pg_dump_backup"):
            wait_for(lambda p=pattern: subprocess.run(["pgrep", "-f", p], capture_output=True).returncode != 0,
                     timeout=30)
    finally:
        locker.rollback()
        locker.close()
    # The module outlives the killed play (ansible's workers run in their own session); once it sees the play's
    # run lock gone it kills pg_dump and removes its partial file. Whatever it could not remove, the re-run does.
    left = os.path.exists(partial[0])
    print(f"\npartial at the kill: {partial[0]} ({partial_bytes} bytes); still there after the kill: {left}")
    deploy_id = lab.query(sql.SQL("SELECT run_id FROM {} WHERE kind = 'deploy'").format(
        sql.Identifier(LEDGER, "runs")))[0][0]
    assert _ledger_run(lab, deploy_id)["dump_path"] is None, "nothing recorded for a dump that never finished"

    # --- (b) a garbage file where the final dump goes; the re-run stops right after its dump (every managed table
    # held in ACCESS SHARE: the dump reads them, the migration cannot lock the first one), nothing migrated.
    final = lab.backup_dir / f"{lab.dbname}-{deploy_id}.dump"
    final.write_bytes(b"garbage, not a dump")
    if not left:  # as a host crash would leave it (no module left to clean up): the re-run must remove it
        Path(partial[0]).write_bytes(b"PGDMP")
    holder = lab.conn(autocommit=False)
    try:
        with holder.cursor() as cur:
            for t in lab.tables:
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(sql.Identifier(lab.schema, t)))
        res = lab.playbook(DEPLOY, extra_vars={"dedup_backup_mode": "dump", "migrate_lock_timeout": "1s",
                                               "migrate_retries": 0})
    finally:
        holder.rollback()
        holder.close()
    assert res.rc != 0 and "Nothing was changed in" in res.output, res.output[-5000:]
    flat = " ".join(res.output.split())
    assert f"Removed the partial dump(s) of a killed run: {partial[0]}" in flat, res.output[-5000:]
    assert f"Set aside {final}" in flat and ".unverified-" in flat
    assert not glob.glob(str(lab.backup_dir / "*.partial-*")), "no partial remains"
    aside = glob.glob(str(final) + ".unverified-*")
    assert len(aside) == 1 and Path(aside[0]).read_bytes() == b"garbage, not a dump"
    run = _ledger_run(lab, deploy_id)
    assert run["dump_path"] == str(final) and run["status"] == "running" and ledger_tables(lab, deploy_id) == []
    assert run["dump_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert set(run["details"]["dump_table_writes"]) == set(lab.tables)
    first_dump = run["dump_path"]
    restored, took = _restore_counts(lab, first_dump)
    assert {t: len(r) for t, r in restored.items()} == counts
    assert restored == original, "every original row of every managed table is in the verified dump"
    print(f"first verified dump: {final.stat().st_size} bytes, restored in {took:.1f} s, rows {counts}")

    # --- (c) rows written to a not-yet-migrated table, then the resume in backup mode dump: a new dump.
    lab.query("INSERT INTO breezeway.task_comments SELECT (jsonb_populate_record(NULL::breezeway.task_comments, "
              "to_jsonb(c) || jsonb_build_object('id', nextval(pg_get_serial_sequence('breezeway.task_comments', "
              "'id'))))).* FROM (SELECT * FROM breezeway.task_comments ORDER BY id LIMIT 3) c")
    written = snapshot(lab)["task_comments"]
    assert len(written) == counts["task_comments"] + 3
    ok = lab.playbook(DEPLOY, extra_vars={"dedup_backup_mode": "dump"})
    assert ok.rc == 0, ok.output[-5000:]
    flat = " ".join(ok.output.split())
    assert "may lack rows written since" in flat and "task_comments: 3 rows inserted" in flat, ok.output[-5000:]
    run = _ledger_run(lab, deploy_id)
    assert run["status"] == "succeeded" and run["dump_path"] != first_dump and "-redump-" in run["dump_path"]
    assert run["details"]["dump_superseded"]["path"] == first_dump
    assert os.path.exists(first_dump), "the first dump stays on disk"
    restored, _ = _restore_counts(lab, run["dump_path"])
    assert restored["task_comments"] == written, "the new dump holds the rows written after the first one"
    for t in lab.tables:
        if t != "task_comments":
            assert restored[t] == original[t], t
    assert lab.duplicates() == {t: 0 for t in lab.tables}
    assert not glob.glob(str(lab.backup_dir / "*.partial-*"))
    assert lab.password not in ok.output and lab.password not in res.output


def test_online_mode_with_dump_backup_is_refused(lab):
    counts = lab.counts()
    res = lab.playbook(DEPLOY, extra_vars={"dedup_mode": "online", "dedup_backup_mode": "dump"})
    assert res.rc != 0
    assert "dedup_mode=online with dedup_backup_mode=dump is refused" in " ".join(res.output.split()), \
        res.output[-4000:]
    assert lab.counts() == counts and list(lab.backup_dir.iterdir()) == []
    assert not ledger_exists(lab) or ledger_tables(lab) == []
