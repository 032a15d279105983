"""The lab from nothing with its own cluster (temp lab_root, free port, throwaway OS users, so the
developer's own lab is never touched): tables, runbook-shaped duplicates, the ETL and its crontab,
convergence, lab_down. Plus the labkit fixture that everyone else's tests use."""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest

from harness import REPO, free_port, pg_bindir, require_root, run_playbook
from labkit import CHILD_TABLES, LAB_SCALE, NATURAL_KEYS, PARENT_TABLES, fill_shape, lab_child_spec


@pytest.fixture(autouse=True)
def _root():
    require_root("the lab tests create throwaway OS users")

SEED_JOBS = [("nashville", "properties"), ("nashville", "tasks")]
SEED_RUNS = 2
PARENTS_PER_RUN = 4
REGIONS = ["nashville", "austin"]


def expected_shape(scale: float = LAB_SCALE) -> dict[str, tuple[int, int]]:
    """{table: (rows, unique)} after the fill and the seed runs of v1 (which re-sends keys of the fill)."""
    out = {}
    for t in lab_child_spec():
        rows, uniq = fill_shape(scale)[t["name"]]
        f = t["fanout"]
        new = 0
        sent = 0
        for region, entity in SEED_JOBS:
            if entity != t["parent"]:
                continue
            ri = REGIONS.index(region)
            for s in range(1, PARENTS_PER_RUN + 1):
                i = (s - 1) * len(REGIONS) + ri
                new += sum(1 for c in range(f) if i * f + c >= uniq)
            sent += PARENTS_PER_RUN * f + 1  # +1: the batch that repeats a child record
        if t["name"] == "task_tags":  # task_tags_unique: v1's DO NOTHING works there
            out[t["name"]] = (rows + new, uniq + new)
        else:
            out[t["name"]] = (rows + SEED_RUNS * sent, uniq + new)
    return out


@pytest.fixture(scope="module")
def managed_lab():
    root = Path(tempfile.mkdtemp(prefix="dedup-labtest-"))
    os.chmod(root, 0o755)
    sfx = uuid.uuid4().hex[:6]
    ev = {
        "lab_root": str(root),
        "lab_port": free_port(),
        "lab_pg_os_user": f"dlp{sfx}",
        "dedup_etl_user": f"dle{sfx}",
        "lab_scale": LAB_SCALE,
    }
    state = {"ev": ev, "root": root, "up": run_playbook(REPO / "playbooks" / "lab_up.yml", extra_vars=ev)}
    try:
        yield state
    finally:
        if root.exists():  # lab_down did not run or failed: clean up by hand
            subprocess.run(["runuser", "-u", ev["lab_pg_os_user"], "--", str(pg_bindir() / "pg_ctl"), "-D",
                            str(root / "pg" / "data"), "-m", "immediate", "stop"], capture_output=True)
            subprocess.run(["crontab", "-u", ev["dedup_etl_user"], "-r"], capture_output=True)
            for user in (ev["dedup_etl_user"], ev["lab_pg_os_user"]):
                subprocess.run(["userdel", "-r", user], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


def connect(state, password=None):
    root, ev = state["root"], state["ev"]
    pw = (root / "secrets" / "db_password").read_text().strip() if password is None else password
    return psycopg2.connect(host="127.0.0.1", port=ev["lab_port"], dbname="breezeway", user="breezeway", password=pw)


def scalar(conn, q, params=None):
    with conn.cursor() as cur:
        cur.execute(q, params)
        return cur.fetchone()[0]


def test_lab_up_from_nothing(managed_lab):
    up, root, ev = managed_lab["up"], managed_lab["root"], managed_lab["ev"]
    assert up.rc == 0 and up.failed() == 0, up.stdout[-5000:]
    secret = root / "secrets" / "db_password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # the cluster: owned by the unprivileged user, its own port, loopback only, scram
    assert pwd.getpwuid((root / "pg" / "data").stat().st_uid).pw_name == ev["lab_pg_os_user"]
    with pytest.raises(psycopg2.OperationalError):
        connect(managed_lab, password="wrong")
    conn = connect(managed_lab)
    try:
        assert scalar(conn, "SHOW listen_addresses") == "127.0.0.1"
        assert int(scalar(conn, "SHOW port")) == ev["lab_port"] != 5432
        assert scalar(conn, "SHOW password_encryption") == "scram-sha-256"
        hba = [ln.split() for ln in (root / "pg" / "data" / "pg_hba.conf").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
        assert [ln for ln in hba if ln[0] == "host"] == [["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]
        tables = scalar(conn, "SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_tables "
                              "WHERE schemaname = 'breezeway' AND tableowner = 'breezeway'")
        assert sorted(tables) == sorted(CHILD_TABLES + PARENT_TABLES)
        uniques = scalar(conn, "SELECT array_agg(conname::text) FROM pg_constraint c "
                               "JOIN pg_class r ON r.oid = c.conrelid "
                               "WHERE c.contype = 'u' AND r.relname = ANY(%s)", (CHILD_TABLES,))
        assert uniques == ["task_tags_unique"]
        for t in lab_child_spec():
            assert scalar(conn, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'breezeway' AND tablename = %s "
                                "AND indexdef LIKE %s", (t["name"], f"%({t['fk']})")) == 1, t["name"]
            assert scalar(conn, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = %s::regclass",
                          (f"breezeway.{t['name']}",)) == 1
    finally:
        conn.close()


def test_duplicate_ratios_at_scale(managed_lab):
    conn = connect(managed_lab)
    try:
        for table, (rows, uniq) in expected_shape().items():
            key = ", ".join(NATURAL_KEYS[table])
            got = scalar(conn, f"SELECT ARRAY[count(*), count(DISTINCT ({key}))] FROM breezeway.{table}")
            assert got == [rows, uniq], table
    finally:
        conn.close()
    # the fill itself has the runbook's ratio wherever the scale leaves enough keys to measure it
    for t in lab_child_spec():
        rows, uniq = fill_shape()[t["name"]]
        if uniq >= 10:
            assert math.isclose(rows / uniq, t["rows"] / t["unique"], rel_tol=0.05), t["name"]
    assert 35_000 < sum(r for r, _ in fill_shape().values()) < 45_000


def test_etl_installed_and_crontab(managed_lab):
    root, ev = managed_lab["root"], managed_lab["ev"]
    etl, user = root / "etl", ev["dedup_etl_user"]
    assert os.readlink(etl / "current") == "releases/v1"
    assert sorted(p.name for p in (etl / "releases" / "v1").glob("*.py")) == [
        "config.py", "etl_base.py", "fixture_api.py", "run_etl.py"]
    assert json.loads((etl / "shared" / "db.json").read_text()) == {
        "host": "127.0.0.1", "port": ev["lab_port"], "dbname": "breezeway", "user": "breezeway"}
    assert pwd.getpwuid(etl.stat().st_uid).pw_name == user
    pgpass = Path(pwd.getpwnam(user).pw_dir) / ".pgpass"
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600 and pwd.getpwuid(pgpass.stat().st_uid).pw_name == user

    cron = subprocess.run(["crontab", "-u", user, "-l"], capture_output=True, text=True, check=True).stdout
    lines = cron.splitlines()
    assert "#Ansible" not in cron and "MAILTO=\"\"" in lines
    etl_lines = [ln for ln in lines if "run_etl.py" in ln and not ln.startswith("#")]
    py = etl_lines[0].split(" && ")[1].split()[0]
    assert sorted(etl_lines) == sorted(
        f"*/15 * * * * cd {etl}/current && {py} run_etl.py {r} {e} >> {etl}/logs/etl.log 2>&1"
        for r in REGIONS for e in ("properties", "tasks"))
    assert any(ln.startswith("10 3 * * * ") and "etl.log" in ln for ln in lines)  # unrelated log rotation
    assert any(ln.startswith("#*/15") and "run_etl.py" in ln for ln in lines)  # commented out by a person
    # the cron line works as written, as the ETL user
    cmd = etl_lines[0].split(" ", 5)[5]
    p = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", cmd], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "table=property_photos sent=17 affected=17" in (etl / "logs" / "etl.log").read_text()


def test_second_lab_up_converges(managed_lab):
    conn = connect(managed_lab)
    try:
        before = scalar(conn, "SELECT count(*) FROM breezeway.task_requirements")
    finally:
        conn.close()
    again = run_playbook(REPO / "playbooks" / "lab_up.yml", extra_vars=managed_lab["ev"])
    assert again.rc == 0 and again.changed() == 0, again.stdout[-4000:]
    check = run_playbook(REPO / "playbooks" / "lab_up.yml", extra_vars=managed_lab["ev"], check=True)
    assert check.rc == 0 and check.changed() == 0, check.stdout[-4000:]
    conn = connect(managed_lab)
    try:
        assert scalar(conn, "SELECT count(*) FROM breezeway.task_requirements") == before
    finally:
        conn.close()


def test_lab_down_removes_everything(managed_lab):
    root, ev = managed_lab["root"], managed_lab["ev"]
    home = Path(pwd.getpwnam(ev["dedup_etl_user"]).pw_dir)
    down = run_playbook(REPO / "playbooks" / "lab_down.yml", extra_vars=ev)
    assert down.rc == 0, down.stdout[-4000:]
    assert not root.exists() and not home.exists()
    for user in (ev["dedup_etl_user"], ev["lab_pg_os_user"]):
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ev["lab_port"])) != 0


def test_labkit_lab_fixture(lab, lab_template):
    """What other tests get: a clone, an etl_dir with v1, a crontab and an inventory of their own."""
    assert lab.dbname != lab_template.dbname
    assert lab.counts() == {t: r for t, (r, _u) in expected_shape().items()}
    assert os.readlink(lab.etl_dir / "current") == "releases/v1"
    assert f"cd {lab.etl_dir}/current && " in lab.crontab()
    secret = lab.inventory / "group_vars" / "all" / "secret.yml"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and lab.password in secret.read_text()
    assert lab.run_etl("austin", "properties").tables["property_photos"]["sent"] == 17
