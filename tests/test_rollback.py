"""rollback.yml end to end on the lab: real PostgreSQL, real pg_dump/pg_restore, real crontab, real ansible-playbook.

The ground truth is a snapshot of every child table taken before the deploy (id -> row as text). After the
deploy the v2 ETL inserts new rows and updates kept rows; after the rollback every table must equal the
original rows, with the ETL's updates and new rows on top (nothing written since is lost or overwritten).
"""

from __future__ import annotations

import json
import shutil
import time

from psycopg2 import sql

from harness import REPO

DEPLOY = REPO / "deploy_dedup.yml"
ROLLBACK = REPO / "rollback.yml"
LEDGER = "dedup_rollout"
ETL_REV1 = {"ETL_FIXTURE_REVISION": "1"}


# --------------------------------------------------------------------------- helpers


def rows(lab, table: str, schema: str | None = None) -> dict[int, str]:
    """id -> the whole row as text."""
    q = sql.SQL("SELECT t.id, t::text FROM {} t").format(sql.Identifier(schema or lab.schema, table))
    return dict(lab.query(q))


def snapshot(lab) -> dict[str, dict[int, str]]:
    return {t: rows(lab, t) for t in lab.tables}


def unique_constraints(lab) -> set[tuple]:
    return set(lab.query(
        "SELECT c.conrelid::regclass::text, c.conname FROM pg_constraint c "
        "WHERE c.contype = 'u' AND c.connamespace = to_regnamespace(%s)", (lab.schema,)))


def runs(lab) -> dict[str, dict]:
    q = sql.SQL("SELECT row_to_json(r)::text FROM {} r").format(sql.Identifier(LEDGER, "runs"))
    return {r["run_id"]: r for r in (json.loads(x[0]) for x in lab.query(q))}


def table_runs(lab, run_id: str) -> dict[str, dict]:
    q = sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE run_id = %s").format(
        sql.Identifier(LEDGER, "table_runs"))
    return {r["table_name"]: r for r in (json.loads(x[0]) for x in lab.query(q, (run_id,)))}


def deploy(lab, *args):
    res = lab.playbook(DEPLOY, *args)
    assert res.rc == 0, res.output[-5000:]
    (deploy_id,) = [r for r, v in runs(lab).items() if v["kind"] == "deploy" and v["status"] == "succeeded"]
    return deploy_id


def flat(text: str) -> str:
    """Output with YAML line folding undone (messages wrap)."""
    return " ".join(text.split())


def etl_writes(lab) -> None:
    """The v2 ETL (current after the deploy) loads revision 1: new rows and updates of kept rows."""
    for region in ("nashville", "austin"):
        for entity in ("properties", "tasks"):
            lab.run_etl(region, entity, env=ETL_REV1)


def assert_rolled_back(lab, original, after_etl, cons_before, cron_before, deploy_id):
    """Every original row is back; the ETL's new rows and updates are kept; constraints, release, cron as before."""
    for t in lab.tables:
        expected = {**original[t], **after_etl[t]}   # original rows, with the ETL's updated/new rows on top
        now = rows(lab, t)
        missing, extra = sorted(expected.keys() - now.keys()), sorted(now.keys() - expected.keys())
        assert not missing and not extra, f"{t}: missing {missing[:10]}, extra {extra[:10]}"
        diff = [i for i in expected if now[i] != expected[i]]
        assert not diff, f"{t}: rows differ: {[(now[i], expected[i]) for i in diff[:3]]}"
    assert unique_constraints(lab) == cons_before
    assert lab.current_release() == "releases/v1"
    assert lab.crontab() == cron_before
    r = runs(lab)
    assert r[deploy_id]["status"] == "rolled_back"
    rb = r[deploy_id + "-rollback"]
    assert (rb["kind"], rb["status"], rb["target_run_id"]) == ("rollback", "succeeded", deploy_id)
    assert all(v["status"] == "rolled_back" for v in table_runs(lab, deploy_id).values())


# --------------------------------------------------------------------------- tests


def test_rollback_after_full_deploy_keeps_etl_writes_then_idempotent_then_redeploy(lab):
    original = snapshot(lab)
    cons_before = unique_constraints(lab)
    cron_before = lab.crontab()

    deploy_id = deploy(lab)
    assert all(v == 0 for v in lab.duplicates().values())
    assert lab.current_release() == "releases/v2"
    etl_writes(lab)
    after_etl = snapshot(lab)
    new_rows = sum(len(after_etl[t].keys() - original[t].keys()) for t in lab.tables)
    updated = sum(1 for t in lab.tables for i in after_etl[t] if i in original[t] and after_etl[t][i] != original[t][i])
    assert new_rows > 0 and updated > 0, "the ETL run must add and update rows for this test to mean anything"
    removed = {t: v["rows_removed"] or 0 for t, v in table_runs(lab, deploy_id).items()}

    # --check: says what it would put back, changes nothing.
    res = lab.playbook(ROLLBACK, check=True)
    assert res.rc == 0, res.output[-5000:]
    for t, n in removed.items():
        if n:
            assert f"{t}: would put back {n} row(s)" in flat(res.output), t
    assert snapshot(lab) == after_etl
    assert lab.current_release() == "releases/v2"
    assert runs(lab)[deploy_id]["status"] == "succeeded"
    assert deploy_id + "-rollback" not in runs(lab)

    res = lab.playbook(ROLLBACK)
    assert res.rc == 0, res.output[-5000:]
    assert_rolled_back(lab, original, after_etl, cons_before, cron_before, deploy_id)
    hist = json.loads((lab.etl_dir / ".dedup-rollout" / "releases.json").read_text())
    assert hist["current"] == "v1" and hist["history"][-1]["action"] == "rollback"
    # The backup tables are kept (cleanup drops them later).
    for t, v in table_runs(lab, deploy_id).items():
        if v["backup_table"]:
            assert len(rows(lab, v["backup_table"], LEDGER)) == v["rows_removed"], t
    reports = list((lab.root / "reports").rglob(f"{deploy_id}-rollback/*/report.md"))
    assert reports and "| task_photos |" in reports[0].read_text()

    # Again, naming the deploy: nothing to do, changed=0. Without a name: green too (an AWX retry), saying so.
    res = lab.playbook(ROLLBACK, "-e", f"dedup_run_id={deploy_id}")
    assert res.rc == 0 and res.changed() == 0, res.output[-5000:]
    res = lab.playbook(ROLLBACK)
    assert res.rc == 0 and res.changed() == 0, res.output[-3000:]
    assert "the last deploy is already rolled back" in flat(res.output), res.output[-3000:]
    res = lab.playbook(ROLLBACK, "-e", "dedup_run_id=20200101T000000Z")
    assert res.rc != 0 and "There is no run 20200101T000000Z in the ledger" in flat(res.output), res.output[-3000:]
    assert_rolled_back(lab, original, after_etl, cons_before, cron_before, deploy_id)

    # Deploy again after the rollback: works, a new deploy id, duplicates gone, v2 live. The ETL's updates made
    # the kept rows differ from their restored duplicates, so the preflight needs divergence allowed.
    second = deploy(lab, "-e", "dedup_allow_divergent=true")
    assert second != deploy_id
    assert all(v == 0 for v in lab.duplicates().values())
    assert lab.current_release() == "releases/v2"
    assert lab.crontab() == cron_before


def test_rollback_from_the_dump_when_backup_tables_are_gone(lab):
    original = snapshot(lab)
    cons_before = unique_constraints(lab)
    cron_before = lab.crontab()
    deploy_id = deploy(lab)
    etl_writes(lab)
    after_etl = snapshot(lab)
    tr = table_runs(lab, deploy_id)
    for v in tr.values():
        if v["backup_table"]:
            lab.query(sql.SQL("DROP TABLE {}").format(sql.Identifier(LEDGER, v["backup_table"])))
    dump = runs(lab)[deploy_id]["dump_path"]

    # Backup tables and dump gone: refuses before anything changes, naming what is missing.
    shutil.move(dump, dump + ".away")
    res = lab.playbook(ROLLBACK)
    assert res.rc != 0
    out = flat(res.output)
    assert "Cannot roll back deploy " + deploy_id in out and "is gone" in out and dump in out, out[-3000:]
    assert "#dedup-paused#" not in lab.crontab()
    assert snapshot(lab) == after_etl and lab.current_release() == "releases/v2"

    # A damaged dump is refused too (sha256 differs from the ledger's).
    shutil.copy(dump + ".away", dump)
    with open(dump, "ab") as fh:
        fh.write(b"x")
    res = lab.playbook(ROLLBACK)
    assert res.rc != 0 and "it is not the verified dump" in flat(res.output), res.output[-3000:]
    assert snapshot(lab) == after_etl

    # The verified dump back: the rows come from it, same result as from the backup tables.
    shutil.move(dump + ".away", dump)
    res = lab.playbook(ROLLBACK)
    assert res.rc == 0, res.output[-5000:]
    assert_rolled_back(lab, original, after_etl, cons_before, cron_before, deploy_id)
    done = runs(lab)[deploy_id + "-rollback"]["details"]["tables"]
    assert {d["source"] for d in done if d["rows_removed"]} == {"dump"}
    # The staging schema is left empty; the backup tables stay gone.
    assert lab.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'dedup_rollout_staging'")[0][0] == 0


def test_rollback_after_a_deploy_killed_mid_migration(lab):
    original = snapshot(lab)
    cons_before = unique_constraints(lab)
    cron_before = lab.crontab()
    blocker = lab.conn(autocommit=False)
    with blocker.cursor() as cur:  # hold task_photos so the run stops there, half the tables migrated
        cur.execute("LOCK TABLE breezeway.task_photos IN ACCESS SHARE MODE")
    proc = lab.start_playbook(DEPLOY, migrate_retries=50, migrate_lock_timeout="1s")
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            ledger = lab.query("SELECT to_regclass('dedup_rollout.table_runs') IS NOT NULL")[0][0]
            if ledger and lab.query("SELECT count(*) FROM dedup_rollout.table_runs "
                                    "WHERE status = 'deduplicated'")[0][0] >= 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the migration never got going")
        time.sleep(2)
        lab.kill_run(proc)
    finally:
        blocker.rollback()
        blocker.close()
    # A statement the killed play had sent may still finish server-side: wait for its sessions to end.
    lab.settle()
    (deploy_id,) = runs(lab).keys()
    assert runs(lab)[deploy_id]["status"] == "running"
    assert "#dedup-paused#" in lab.crontab()
    assert lab.current_release() == "releases/v1"
    half = table_runs(lab, deploy_id)
    assert 2 <= len(half) < len(lab.tables)

    res = lab.playbook(ROLLBACK)
    assert res.rc == 0, res.output[-5000:]
    # No ETL ran in between: every table is exactly its original rows again.
    assert_rolled_back(lab, original, original, cons_before, cron_before, deploy_id)
    # Tables the killed play finished server-side after the kill are in the ledger too, and rolled back as well.
    assert set(half) <= set(table_runs(lab, deploy_id))
