"""deploy_dedup.yml end to end on the lab: real PostgreSQL, real crontab, real ansible-playbook.

Every test asserts what ended up in the database, the crontab and on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

from harness import REPO, VENV_BIN, ansible_env, parse_recap
from labkit import NATURAL_KEYS

DEPLOY = REPO / "deploy_dedup.yml"
LEDGER = "dedup_rollout"


# --------------------------------------------------------------------------- helpers


def snapshot(lab) -> dict[str, set[tuple]]:
    """Every row of every child table, as tuples of text (the ground truth before a deploy)."""
    out = {}
    for t in lab.tables:
        rows = lab.query(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(lab.schema, t)))
        out[t] = {r[0] for r in rows}
    return out


def rows_of(lab, schema: str, table: str) -> set[str]:
    rows = lab.query(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table)))
    return {r[0] for r in rows}


def ledger_tables(lab, run_id: str | None = None) -> list[dict]:
    q = sql.SQL("SELECT row_to_json(r)::text FROM {} r").format(sql.Identifier(LEDGER, "table_runs"))
    rows = [json.loads(r[0]) for r in lab.query(q)]
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def unique_constraints(lab) -> dict[str, set[tuple]]:
    rows = lab.query(
        "SELECT c.conrelid::regclass::text, c.conname, "
        "ARRAY(SELECT a.attname::text FROM unnest(c.conkey) k JOIN pg_attribute a "
        "      ON a.attrelid = c.conrelid AND a.attnum = k ORDER BY 1) "
        "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE c.contype = 'u' AND n.nspname = %s",
        (lab.schema,),
    )
    out: dict[str, set[tuple]] = {}
    for rel, name, cols in rows:
        out.setdefault(rel.split(".")[-1], set()).add((name, tuple(cols)))
    return out


def ledger_exists(lab) -> bool:
    return lab.query("SELECT to_regnamespace(%s) IS NOT NULL", (LEDGER,))[0][0]


def assert_nothing_changed(lab, before_counts, before_cron, before_constraints):
    assert lab.counts() == before_counts
    assert lab.crontab() == before_cron
    assert unique_constraints(lab) == before_constraints
    assert not any(lab.backup_dir.iterdir()), "a dump was written"


# --------------------------------------------------------------------------- the whole runbook


def test_deploy_end_to_end_then_idempotent(lab):
    """Duplicates gone, constraints there, nothing lost, dependants intact, ETL v2 live, cron identical."""
    original = snapshot(lab)
    cron_before = lab.crontab()
    uniq_before = lab.unique_counts()
    # Dependants of a child table that must survive: a view, a grant, a trigger.
    admin = lab.admin_conn()
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE dedup_reader_e2e")
        cur.execute("GRANT USAGE ON SCHEMA breezeway TO dedup_reader_e2e")
    admin.close()
    c = lab.conn()
    with c.cursor() as cur:
        cur.execute("CREATE VIEW breezeway.v_photo_count AS SELECT property_pk, count(*) AS n "
                    "FROM breezeway.property_photos GROUP BY property_pk")
        cur.execute("GRANT SELECT ON breezeway.property_photos TO dedup_reader_e2e")
        cur.execute("CREATE TABLE breezeway.photo_audit (n bigint)")
        cur.execute("CREATE FUNCTION breezeway.photo_audit_fn() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$BEGIN INSERT INTO breezeway.photo_audit VALUES (NEW.id); RETURN NEW; END$$")
        cur.execute("CREATE TRIGGER photo_audit AFTER INSERT ON breezeway.property_photos "
                    "FOR EACH ROW EXECUTE FUNCTION breezeway.photo_audit_fn()")
        cur.execute("SELECT 'breezeway.property_photos'::regclass::oid")
        oid_before = cur.fetchone()[0]
    c.close()

    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-5000:]

    # Zero duplicates, one row per distinct key, the constraints.
    assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
    assert lab.counts() == uniq_before
    cons = unique_constraints(lab)
    for table, key in NATURAL_KEYS.items():
        assert any(set(cols) == set(key) for _, cols in cons.get(table, set())), (table, cons.get(table))
    assert cons["task_tags"] == {("task_tags_unique", ("tag_pk", "task_pk"))}, "nothing added beside task_tags_unique"

    # The kept row of each key is the oldest (smallest id), and every original row is in the table or the backup.
    runs = ledger_tables(lab)
    deploy_id = runs[0]["run_id"]
    for t in lab.tables:
        key = sql.SQL(", ").join(map(sql.Identifier, NATURAL_KEYS[t]))
        kept_wrong = lab.query(sql.SQL(
            "SELECT count(*) FROM {t} x WHERE x.id <> (SELECT min(b.id) FROM (SELECT id, {k} FROM {t} UNION ALL "
            "SELECT id, {k} FROM {b}) b WHERE ({kb}) = ({kx}))").format(
                t=sql.Identifier("breezeway", t), k=key,
                b=sql.Identifier(LEDGER, f"{t}__{deploy_id}") if any(
                    r["table_name"] == t and r["backup_table"] for r in runs) else sql.Identifier("breezeway", t),
                kb=sql.SQL(", ").join(sql.Identifier("b", c) for c in NATURAL_KEYS[t]),
                kx=sql.SQL(", ").join(sql.Identifier("x", c) for c in NATURAL_KEYS[t])))[0][0]
        assert kept_wrong == 0, f"{t}: {kept_wrong} kept rows are not the oldest of their key"
        now = rows_of(lab, "breezeway", t)
        backup = next((r["backup_table"] for r in runs if r["table_name"] == t and r["backup_table"]), None)
        saved = rows_of(lab, LEDGER, backup) if backup else set()
        assert now | saved == original[t], f"{t}: rows lost"
        assert not (now & saved), f"{t}: a row is both kept and removed"

    # Dependants: same OID, view works, grant intact, trigger exists and fired only for new rows.
    c = lab.conn()
    with c.cursor() as cur:
        cur.execute("SELECT 'breezeway.property_photos'::regclass::oid")
        assert cur.fetchone()[0] == oid_before
        cur.execute("SELECT sum(n) FROM breezeway.v_photo_count")
        assert cur.fetchone()[0] == uniq_before["property_photos"]
        cur.execute("SELECT has_table_privilege('dedup_reader_e2e', 'breezeway.property_photos', 'SELECT')")
        assert cur.fetchone()[0] is True
        cur.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'photo_audit'")
        assert cur.fetchone()[0] == "O"
        cur.execute("SELECT count(*) FROM breezeway.photo_audit")
        audited = cur.fetchone()[0]
    c.close()
    smoke_inserted = audited  # the smoke test's v2 runs may insert photos; the migration must not have
    assert smoke_inserted < uniq_before["property_photos"], "the migration's re-insert fired the user trigger"

    # ETL: v2 current, v1 kept, crontab byte-identical.
    assert lab.current_release().endswith("v2")
    assert (lab.etl_dir / "releases" / "v1").is_dir()
    assert lab.crontab() == cron_before

    # Dump: 0600, verified, recorded with its sha256.
    run = json.loads(lab.query(sql.SQL("SELECT row_to_json(r)::text FROM {} r WHERE kind = 'deploy'").format(
        sql.Identifier(LEDGER, "runs")))[0][0])
    assert run["status"] == "succeeded"
    dump = Path(run["dump_path"])
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == run["dump_sha256"]

    # Report: JSON + Markdown + the rendered SQL, owner-only; the password appears nowhere.
    reports = sorted((lab.root / "reports").glob("*/*/report.json"))
    assert reports, "no report written"
    report = json.loads(reports[-1].read_text())
    db = report["databases"][0]
    assert {t["table"] for t in db["tables"]} == set(NATURAL_KEYS)
    assert (reports[-1].parent / "report.md").read_text().count("|") > 20
    sql_files = list(reports[-1].parent.glob("*/sql/*.sql"))
    assert len(sql_files) >= 5
    for f in [*reports[-1].parent.rglob("*")]:
        if f.is_file():
            assert lab.password not in f.read_text(), f"password in {f}"
    assert lab.password not in res.output

    # A second run on the finished environment changes nothing.
    again = lab.playbook(DEPLOY)
    assert again.rc == 0, again.output[-3000:]
    assert again.changed() == 0, again.output[-3000:]


def test_check_mode_changes_nothing(lab):
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    res = lab.playbook(DEPLOY, check=True)
    assert res.rc == 0, res.output[-4000:]
    assert "would dump database" in res.stdout.lower()
    assert_nothing_changed(lab, counts, cron, cons)
    assert not ledger_exists(lab)
    assert lab.current_release().endswith("v1")


# --------------------------------------------------------------------------- refusals before any change


def test_preflight_refusals_change_nothing(lab):
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    cases = [
        ({"dedup_tables": [{"name": "task_requirementz", "natural_key": ["task_pk", "requirement_id"]}]},
         'table "breezeway"."task_requirementz" does not exist'),
        ({"dedup_tables": [{"name": "task_photos", "natural_key": ["task_pk", "photo_idd"]}]},
         '"photo_idd" does not exist in table "breezeway"."task_photos"'),
        ({"dedup_tables": [{"name": "task_photos; DROP TABLE x", "natural_key": ["task_pk"]}]},
         "looks like SQL"),
        ({"dedup_tables": []}, "dedup_tables must list at least one table"),
        ({"dedup_db_password": "definitely-wrong"}, "authentication failed"),
        ({"dedup_db_port": 1}, "cannot reach PostgreSQL"),
        ({"preflight_disk_reserve_bytes": 1 << 60}, "Not enough free disk"),
        ({"dedup_forbid_superuser": True, "dedup_db_user": "postgres", "dedup_db_password": lab.pg.password},
         "is a PostgreSQL superuser"),
    ]
    for extra, expected in cases:
        res = lab.playbook(DEPLOY, extra_vars=extra)
        assert res.rc != 0, f"{extra} should fail"
        assert expected in res.output, (expected, res.output[-3000:])
        assert "definitely-wrong" not in res.output, "a password reached the output"
        assert_nothing_changed(lab, counts, cron, cons)
        assert not ledger_exists(lab)


def test_divergent_duplicates_stop_unless_allowed(lab):
    c = lab.conn()
    with c.cursor() as cur:
        cur.execute("UPDATE breezeway.task_photos SET url = url || '?edited' "
                    "WHERE id = (SELECT max(id) FROM breezeway.task_photos)")
    c.close()
    counts, cron, cons = lab.counts(), lab.crontab(), unique_constraints(lab)
    res = lab.playbook(DEPLOY)
    assert res.rc != 0
    assert "task_photos: 1 natural keys have rows that differ" in res.output, res.output[-3000:]
    assert_nothing_changed(lab, counts, cron, cons)
    ok = lab.playbook(DEPLOY, extra_vars={"dedup_allow_divergent": True})
    assert ok.rc == 0, ok.output[-3000:]
    assert lab.duplicates()["task_photos"] == 0


def test_null_keys_are_deduplicated_with_nulls_not_distinct(lab):
    c = lab.conn()
    with c.cursor() as cur:
        cur.execute("ALTER TABLE breezeway.task_comments ALTER COLUMN comment_id DROP NOT NULL")
        cur.execute("INSERT INTO breezeway.task_comments (task_pk, comment_id, body) "
                    "SELECT DISTINCT task_pk, NULL::int, 'no id' FROM breezeway.task_comments LIMIT 3")
        cur.execute("INSERT INTO breezeway.task_comments (task_pk, comment_id, body) "
                    "SELECT task_pk, NULL::int, 'no id' FROM breezeway.task_comments WHERE comment_id IS NULL")
    c.close()
    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-4000:]
    nulls = lab.query("SELECT count(*), count(DISTINCT task_pk) FROM breezeway.task_comments WHERE comment_id IS NULL")
    assert nulls[0][0] == nulls[0][1], "NULL keys deduplicated like any other key"
    nnd = lab.query("SELECT i.indnullsnotdistinct FROM pg_index i JOIN pg_constraint c ON c.conindid = i.indexrelid "
                    "WHERE c.conrelid = 'breezeway.task_comments'::regclass AND c.contype = 'u'")
    assert nnd == [(True,)]


def test_second_deploy_at_the_same_time_is_refused(lab):
    """The run lock: while one run holds it, another stops in preflight with a clear message."""
    # The key as library/pg_run_lock.py derives it (lock name / database), held from this process.
    key = int.from_bytes(hashlib.sha256(f"dedup-rollout/{lab.dbname}".encode()).digest()[:8], "big", signed=True)
    holder = lab.conn()
    with holder.cursor() as cur:
        cur.execute("SET application_name = 'dedup-rollout/lock run=other'")
        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    counts, cron = lab.counts(), lab.crontab()
    try:
        res = lab.playbook(DEPLOY)
    finally:
        holder.close()
    assert res.rc != 0
    assert "another dedup-rollout run holds the lock" in res.output, res.output[-3000:]
    assert lab.counts() == counts and lab.crontab() == cron


# --------------------------------------------------------------------------- interruption and resume


def test_killed_mid_migration_resumes_and_loses_nothing(lab):
    """SIGKILL the play while a table waits for its lock; the re-run resumes the same deploy and ends correct."""
    original = snapshot(lab)
    uniq = lab.unique_counts()
    cron_before = lab.crontab()
    blocker = lab.conn(autocommit=False)
    with blocker.cursor() as cur:  # hold task_photos (5th table) so the run stops there, mid-migration
        cur.execute("LOCK TABLE breezeway.task_photos IN ACCESS SHARE MODE")
    proc = lab.start_playbook(DEPLOY, migrate_retries=50, migrate_lock_timeout="1s")
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [r for r in (ledger_tables(lab) if ledger_exists(lab) else []) if r["status"] == "deduplicated"]
            if len(done) >= 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the migration never got going")
        time.sleep(2)
        lab.kill_run(proc)
    finally:
        blocker.rollback()
        blocker.close()
    # The killed play's module process may still finish the table in flight: wait for its session to end,
    # as the next run (and rollback) do, before judging what is where.
    lab.settle()
    partial = ledger_tables(lab)
    deploy_id = partial[0]["run_id"]
    assert "#dedup-paused#" in lab.crontab(), "the ETL stays paused after a kill mid-migration"
    # Nothing lost even now: each table equals its original rows minus exactly what its backup holds.
    for t in lab.tables:
        backup = next((r["backup_table"] for r in partial if r["table_name"] == t and r["backup_table"]), None)
        now = rows_of(lab, "breezeway", t)
        saved = rows_of(lab, LEDGER, backup) if backup else set()
        assert now | saved == original[t], t

    res = lab.playbook(DEPLOY)
    assert res.rc == 0, res.output[-4000:]
    assert f"Resuming the unfinished deploy {deploy_id}" in res.output
    assert lab.counts() == uniq
    assert all(v == 0 for v in lab.duplicates().values())
    final = ledger_tables(lab, deploy_id)
    for t in lab.tables:
        backup = next((r["backup_table"] for r in final if r["table_name"] == t and r["backup_table"]), None)
        now = rows_of(lab, "breezeway", t)
        saved = rows_of(lab, LEDGER, backup) if backup else set()
        assert now | saved == original[t], f"{t}: rows lost across the kill"
    assert lab.crontab() == cron_before
    runs = lab.query(sql.SQL("SELECT run_id, status FROM {}").format(sql.Identifier(LEDGER, "runs")))
    assert runs == [(deploy_id, "succeeded")]


# --------------------------------------------------------------------------- two environments, vault


def _vault_encrypt(value: str, vault_pass_file: Path) -> str:
    out = subprocess.run(
        [str(VENV_BIN / "ansible-vault"), "encrypt_string", "--vault-password-file", str(vault_pass_file),
         "--stdin-name", "vault_dedup_db_password"],
        input=value, capture_output=True, text=True, check=True, env=ansible_env(),
    )
    return out.stdout


def test_two_environments_with_vault_password(lab, tmp_path):
    """Staging-like and production-like inventories, password only in ansible-vault; nowhere in output."""
    from labkit import write_inventory

    prod_db = lab.dbname + "_prod"
    lab.pg.create_database(prod_db, template="lab_template", owner="breezeway")
    vault_pass = tmp_path / "vault-pass"
    vault_pass.write_text("vault-Secret-for-tests\n")
    os.chmod(vault_pass, 0o600)
    try:
        envs = {}
        for name, db in (("staging", lab.dbname), ("production", prod_db)):
            root = tmp_path / name
            root.mkdir()
            (root / "backups").mkdir()
            inv = write_inventory(root / name, pg=lab.pg, dbname=db, password="", etl_user=lab.etl_user,
                                  etl_dir=lab.etl_dir, root=root)
            secret = inv / "group_vars" / "all" / "secret.yml"
            secret.unlink()
            (inv / "group_vars" / "all" / "vault.yml").write_text(_vault_encrypt(lab.password, vault_pass))
            main = inv / "group_vars" / "all" / "main.yml"
            main.write_text(main.read_text() + 'dedup_db_password: "{{ vault_dedup_db_password }}"\n')
            if name == "production":  # production here: database only, no ETL host
                hosts = (inv / "hosts.yml").read_text().replace("lab-etl: null", "{}").replace(
                    "hosts:\n        {}", "hosts: {}")
                (inv / "hosts.yml").write_text(hosts)
            envs[name] = (inv, db, root)
        for name, (inv, db, root) in envs.items():
            proc = subprocess.run(
                [str(VENV_BIN / "ansible-playbook"), str(DEPLOY), "-i", str(inv),
                 "--vault-password-file", str(vault_pass)],
                cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=900,
            )
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out[-4000:]
            assert parse_recap(proc.stdout)
            assert lab.password not in out
            conn = psycopg2.connect(**lab.pg.dsn(db))
            with conn.cursor() as cur:
                for t, key in NATURAL_KEYS.items():
                    cur.execute(sql.SQL("SELECT count(*) - count(DISTINCT ({k})) FROM {t}").format(
                        k=sql.SQL(", ").join(map(sql.Identifier, key)), t=sql.Identifier("breezeway", t)))
                    assert cur.fetchone()[0] == 0, (name, t)
            conn.close()
            for f in (root / "reports").rglob("*"):
                if f.is_file():
                    assert lab.password not in f.read_text(), f
    finally:
        lab.pg.drop_database(prod_db)
