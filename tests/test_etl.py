"""The reference ETL on a lab clone: v1 adds duplicates on every run; v2 (after the dedup and the
UNIQUE constraints, done here by hand) adds none on repeated runs and updates changed payloads."""

from __future__ import annotations

import runpy

import pytest
from psycopg2 import sql

from labkit import ETL_RELEASES, NATURAL_KEYS

TASK_CHILDREN = ["task_requirements", "task_assignments", "task_photos", "task_comments", "task_tags"]


def dedup_and_constrain(lab) -> None:
    """What the migration does: keep the oldest row per natural key, add the UNIQUE constraints."""
    conn = lab.conn(autocommit=False)
    with conn, conn.cursor() as cur:
        for table, key in NATURAL_KEYS.items():
            cols = sql.SQL(", ").join(map(sql.Identifier, key))
            tbl = sql.Identifier(lab.schema, table)
            cur.execute(sql.SQL(
                "DELETE FROM {tbl} t USING (SELECT min(id) AS keep, {cols} FROM {tbl} GROUP BY {cols}) k "
                "WHERE ({tcols}) = ({kcols}) AND t.id <> k.keep"
            ).format(tbl=tbl, cols=cols,
                     tcols=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in key),
                     kcols=sql.SQL(", ").join(sql.SQL("k.{}").format(sql.Identifier(c)) for c in key)))
            if table != "task_tags":
                cur.execute(sql.SQL("ALTER TABLE {tbl} ADD CONSTRAINT {name} UNIQUE ({cols})").format(
                    tbl=tbl, name=sql.Identifier(f"{table}_natural_key"), cols=cols))
    conn.close()
    assert set(lab.duplicates().values()) == {0}


def test_v1_adds_duplicates_on_every_run(lab):
    before, dup_before = lab.counts(), lab.duplicates()
    for n in (1, 2):
        prev = lab.counts()
        run = lab.run_etl("nashville", "tasks")
        now = lab.counts()
        assert run.tables["tasks"] == {"sent": 4, "affected": 4}
        for table in TASK_CHILDREN[:-1]:
            assert run.tables[table]["sent"] > 0
            assert now[table] - prev[table] == run.tables[table]["sent"] == run.tables[table]["affected"], (n, table)
        # task_tags has task_tags_unique: the same bug is harmless there.
        assert now["task_tags"] == prev["task_tags"] and run.tables["task_tags"]["affected"] == 0
    after = lab.duplicates()
    assert after["task_requirements"] >= dup_before["task_requirements"] + 2 * 16
    assert after["task_tags"] == 0
    assert lab.counts()["property_photos"] == before["property_photos"]


def test_duplicates_are_exact_copies(lab):
    """Fill and ETL agree on the payload of a key: the duplicates are not divergent."""
    lab.run_etl("nashville", "properties")
    lab.run_etl("austin", "tasks")
    for table in NATURAL_KEYS:
        cols = [r[0] for r in lab.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "AND column_name NOT IN ('id', 'created_at') ORDER BY ordinal_position", (lab.schema, table))]
        (distinct_rows,) = lab.query(sql.SQL("SELECT count(DISTINCT ({cols})) FROM {tbl}").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, cols)), tbl=sql.Identifier(lab.schema, table)))[0]
        assert distinct_rows == lab.unique_counts()[table], table
    # created_at grows with id (the "oldest" row is the first one)
    assert lab.query(
        "SELECT count(*) FROM (SELECT created_at < lag(created_at) OVER (ORDER BY id) AS back "
        "FROM breezeway.task_requirements) s WHERE back")[0][0] == 0


def test_v2_adds_no_duplicates_and_updates_payloads(lab):
    dedup_and_constrain(lab)
    lab.install_release("v2", natural_keys=NATURAL_KEYS)
    assert lab.current_release() == "releases/v2"
    jobs = [(r, e) for r in ("nashville", "austin") for e in ("properties", "tasks", "reservations")]
    for region, entity in jobs:
        lab.run_etl(region, entity)
    first = lab.counts()
    for region, entity in jobs:
        run = lab.run_etl(region, entity)
        children = [t for t in run.tables if t in NATURAL_KEYS]
        assert children and all(run.tables[t]["affected"] == 0 for t in children), run.tables
    assert lab.counts() == first
    assert set(lab.duplicates().values()) == {0}

    # The upstream data changes: v2 updates in place.
    run = lab.run_etl("nashville", "tasks", env={"ETL_FIXTURE_REVISION": "1"})
    # 4 tasks x 4 requirements; the batch's repeated record was folded before sending.
    assert run.tables["task_requirements"] == {"sent": 16, "affected": 16}
    assert lab.counts() == first
    assert set(lab.duplicates().values()) == {0}
    names = lab.query(
        "SELECT r.name FROM breezeway.task_requirements r JOIN breezeway.tasks t ON t.id = r.task_pk "
        "WHERE t.region_code = 'nashville' AND t.source_id BETWEEN 1 AND 4")
    assert len(names) == 16 and all(n.endswith("-r1") for (n,) in names)
    austin = lab.query(
        "SELECT r.name FROM breezeway.task_requirements r JOIN breezeway.tasks t ON t.id = r.task_pk "
        "WHERE t.region_code = 'austin' AND t.source_id = 1")
    assert austin and all(n.endswith("-r0") for (n,) in austin)


def test_v2_without_unique_constraints_fails_loudly(lab):
    lab.install_release("v2")
    before = lab.counts()
    run = lab.run_etl("nashville", "properties", check=False)
    assert run.rc != 0
    assert "no unique or exclusion constraint" in run.stderr
    assert lab.counts() == before


def test_v2_reads_natural_keys_json(lab):
    dedup_and_constrain(lab)
    wrong = dict(NATURAL_KEYS, task_comments=["comment_id", "region_code"])
    lab.install_release("v2", natural_keys=wrong)
    run = lab.run_etl("nashville", "tasks", check=False)
    assert run.rc != 0 and "task_comments" not in run.tables
    lab.install_release("v2", natural_keys=NATURAL_KEYS)
    assert lab.run_etl("nashville", "tasks").rc == 0


def test_releases_config():
    v1 = runpy.run_path(str(ETL_RELEASES / "v1" / "config.py"))["CHILD_TABLES"]
    v2 = runpy.run_path(str(ETL_RELEASES / "v2" / "config.py"))["CHILD_TABLES"]
    assert v1["task_comments"]["natural_key"] == ["comment_id", "region_code"]  # the historical bug
    assert {t: c["natural_key"] for t, c in v2.items()} == NATURAL_KEYS


@pytest.mark.parametrize("args", [[], ["nashville"], ["nashville", "bogus"]])
def test_run_etl_usage_errors(lab, args):
    import subprocess

    p = subprocess.run(["runuser", "-u", lab.etl_user, "--", lab.etl_python, "run_etl.py", *args],
                       cwd=lab.etl_dir / "current", capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
