"""Many regions, one command (issue 16): four lab regions in one inventory, each with its own database, ETL
directory and cron file, run by one deploy_dedup.yml at once (forks).

Real parts only: four databases cloned from the lab template on the harness cluster, four real /etc/cron.d files,
four ETL release trees, the real ansible-playbook. The documented policy (README, Many regions):
- preflight is one gate: a region that fails it (here: divergent duplicates) stops every region before anything
  changes;
- after the gate each region stands alone: a region that fails mid-migration stops with its ETL paused and its
  deploy recorded as failed, the others finish, and the report lists every region's outcome; a re-run after the
  fix finishes that region and changes nothing in the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from harness import REPO
from labkit import DB_USER, Lab, LabTemplate, _run, write_inventory

DEPLOY = REPO / "deploy_dedup.yml"
REGIONS = ["north", "east", "south", "west"]
FAILING = "south"
MARKER = "#dedup-paused# "  # etl_pause_marker


def cron_file_text(crontab: str, user: str, old_dir: Path, new_dir: Path) -> str:
    """The lab's crontab as a /etc/cron.d file: a user field after the schedule, this region's ETL dir."""
    out = []
    for line in crontab.replace(str(old_dir), str(new_dir)).splitlines():
        m = re.match(r"^(\s*(?:\S+\s+){5})(.*)$", line)
        if line.strip() and not line.lstrip().startswith("#") and "=" not in line.split()[0] and m:
            line = f"{m.group(1)}{user} {m.group(2)}"
        out.append(line)
    return "\n".join(out) + "\n"


class Region:
    def __init__(self, name: str, lab: Lab, cron_file: Path):
        self.name, self.lab, self.cron_file = name, lab, cron_file
        self.db_host, self.etl_host = f"db-{name}", f"etl-{name}"

    def job_lines(self) -> list[str]:
        return [ln for ln in self.cron_file.read_text().splitlines() if "run_etl.py" in ln and not ln.startswith("#*/")]

    def paused(self) -> bool:
        lines = self.job_lines()
        assert lines, self.cron_file.read_text()
        states = {ln.startswith(MARKER) for ln in lines}
        assert len(states) == 1, lines
        return states.pop()

    def ledger_runs(self) -> list[tuple]:
        """(run_id, kind, status, etl_release_after) of every run in the ledger, oldest first."""
        return self.lab.query("SELECT run_id, kind, status, etl_release_after FROM dedup_rollout.runs"
                              " ORDER BY started_at")


@pytest.fixture(scope="module")
def regions(lab_template: LabTemplate):
    t = lab_template
    root = Path(tempfile.mkdtemp(prefix="dedup-regions-"))
    os.chmod(root, 0o755)
    tag = uuid.uuid4().hex[:8]
    inv = root / "inventory"
    out: list[Region] = []
    try:
        write_inventory(inv, pg=t.pg, dbname=t.dbname, password=t.password, etl_user=t.etl_user,
                        etl_dir=root / "unused", root=root)
        (root / "backups").mkdir()
        hosts = {"all": {"children": {"db": {"hosts": {}}, "etl": {"hosts": {}}},
                         "vars": yaml.safe_load((inv / "hosts.yml").read_text())["all"]["vars"]}}
        for name in REGIONS:
            dbname = f"reg_{tag}_{name}"
            t.pg.create_database(dbname, template=t.dbname, owner=DB_USER)
            etl_dir = root / name / "etl"
            for sub in ("releases", "shared", "logs"):
                (etl_dir / sub).mkdir(parents=True)
            (etl_dir / "shared" / "db.json").write_text(json.dumps(
                {"host": "127.0.0.1", "port": t.pg.port, "dbname": dbname, "user": DB_USER}, indent=4) + "\n")
            lab = Lab(pg=t.pg, root=root, dbname=dbname, password=t.password, etl_user=t.etl_user,
                      etl_home=t.etl_home, etl_dir=etl_dir, etl_python=t.etl_python, inventory=inv,
                      backup_dir=root / "backups")
            lab.install_release("v1")
            cron_file = Path("/etc/cron.d") / f"dedupreg-{tag}-{name}"
            cron_file.write_text(cron_file_text(t.crontab_text, t.etl_user, t.etl_dir, etl_dir))
            os.chmod(cron_file, 0o644)
            region = Region(name, lab, cron_file)
            out.append(region)
            hosts["all"]["children"]["db"]["hosts"][region.db_host] = None
            hosts["all"]["children"]["etl"]["hosts"][region.etl_host] = None
            hosts["all"]["children"][name] = {"hosts": {region.db_host: None, region.etl_host: None}}
            (inv / "host_vars").mkdir(exist_ok=True)
            (inv / "host_vars" / f"{region.db_host}.yml").write_text(yaml.safe_dump({"dedup_db_name": dbname}))
            (inv / "host_vars" / f"{region.etl_host}.yml").write_text(yaml.safe_dump({
                "dedup_etl_dir": str(etl_dir), "etl_pause_cron_file": str(cron_file),
                "etl_resume_cron_file": str(cron_file)}))
        (inv / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        pgpass = t.etl_home / ".pgpass"
        pgpass.write_text(f"127.0.0.1:{t.pg.port}:*:{DB_USER}:{t.password}\n")
        os.chmod(pgpass, 0o600)
        shutil.chown(pgpass, t.etl_user, t.etl_user)
        yield out
    finally:
        for r in out:
            r.cron_file.unlink(missing_ok=True)
            t.pg.drop_database(r.lab.dbname)
        _run(["pkill", "-9", "-f", str(inv)])
        shutil.rmtree(root, ignore_errors=True)


def deploy(regions: list[Region]):
    res = regions[0].lab.playbook(DEPLOY)
    (regions[0].lab.root / "last-deploy.log").write_text(res.output)
    return res


def admin(region: Region, statement: str) -> None:
    with region.lab.admin_conn() as c, c.cursor() as cur:
        cur.execute(statement)


def unique_constrained(region: Region) -> set[str]:
    """The lab's child tables that have a UNIQUE constraint."""
    return {t for (t,) in region.lab.query(
        "SELECT c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
        " WHERE k.contype = 'u' AND k.connamespace = 'breezeway'::regnamespace")} & set(region.lab.tables)


def reports(regions: list[Region]) -> list[dict]:
    found = sorted((regions[0].lab.root / "reports").rglob("report.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in found]


def test_a_region_failing_preflight_stops_every_region_before_any_change(regions):
    bad = regions[1]
    # A duplicate whose payload differs: merging it would lose data, preflight refuses it.
    admin(bad,
        "INSERT INTO breezeway.task_requirements (task_pk, requirement_id, name, quantity, is_done, cost, details,"
        " due_at) SELECT task_pk, requirement_id, name || ' (edited)', quantity, is_done, cost, details, due_at"
        " FROM breezeway.task_requirements ORDER BY id LIMIT 1")
    before = {r.name: (r.lab.counts(), r.cron_file.read_text(), r.lab.current_release()) for r in regions}
    res = deploy(regions)
    assert res.rc != 0, res.output[-4000:]
    assert "task_requirements" in res.output and bad.db_host in res.output
    for r in regions:
        assert (r.lab.counts(), r.cron_file.read_text(), r.lab.current_release()) == before[r.name], r.name
        assert not r.paused()
        assert r.lab.query("SELECT to_regclass('dedup_rollout.runs')")[0][0] is None or all(
            run[2] != "running" for run in r.ledger_runs() if run[1] == "deploy"), r.name
    admin(bad,
        "DELETE FROM breezeway.task_requirements WHERE name LIKE '%% (edited)'")


def test_one_region_failing_mid_migration_stops_alone_and_the_report_lists_every_region(regions):
    failing = next(r for r in regions if r.name == FAILING)
    # A DDL guard of the kind production databases have: it blocks the constraint of one table (not the first one
    # migrated), so the region fails after it has changed something.
    admin(failing, """
        CREATE FUNCTION public.block_photo_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF current_query() ILIKE '%task_photos%' THEN
            RAISE EXCEPTION 'change freeze: DDL on task_photos is blocked';
          END IF;
        END $$;
        CREATE EVENT TRIGGER block_photo_ddl ON ddl_command_start WHEN TAG IN ('ALTER TABLE')
          EXECUTE FUNCTION public.block_photo_ddl();""")
    dups_before = {r.name: r.lab.duplicates() for r in regions}
    assert all(sum(d.values()) > 0 for d in dups_before.values())

    res = deploy(regions)
    assert res.rc != 0, res.output[-6000:]
    assert "change freeze" in res.output
    others = [r for r in regions if r is not failing]
    for r in others:
        # A region that failed on its own (not the one this test breaks) says why first.
        assert res.recap[r.db_host]["failed"] == 0, [ln for ln in res.output.splitlines()
                                                     if f"[{r.db_host}" in ln or "[ERROR]" in ln][-12:]
        assert sum(r.lab.duplicates().values()) == 0, r.name
        assert not r.paused(), r.name
        assert r.lab.current_release() != "releases/v1", r.name
        # Each region's record names its own ETL release.
        assert [(run[2], run[3]) for run in r.ledger_runs() if run[1] == "deploy"] == [
            ("succeeded", Path(r.lab.current_release()).name)], r.name
        assert res.recap[r.db_host]["failed"] == 0 and res.recap[r.etl_host]["failed"] == 0, res.recap
        # The regions share the run's deploy id: each region's dump carries its db host, so two same-named
        # databases dumped on one machine could never share a file.
        (dump_path,), = r.lab.query("SELECT dump_path FROM dedup_rollout.runs WHERE kind = 'deploy'")
        assert Path(dump_path).name.startswith(f"{r.lab.dbname}-{r.db_host}-") and Path(dump_path).is_file(), dump_path
    # Partly migrated: the tables before task_photos are done, task_photos has no constraint.
    assert sum(failing.lab.duplicates().values()) < sum(dups_before[FAILING].values())
    assert unique_constrained(failing) == set(failing.lab.tables) - {"task_photos"} - set(
        t for t, n in failing.lab.duplicates().items() if n)
    assert all(unique_constrained(r) == set(r.lab.tables) for r in others)
    assert failing.paused(), res.output[-8000:]
    assert failing.lab.current_release() == "releases/v1"
    assert [run[2] for run in failing.ledger_runs() if run[1] == "deploy"] == ["failed"]
    assert res.recap[failing.db_host]["failed"] == 1, res.recap

    report = reports(regions)[-1]
    outcome = {d["region"]: d["outcome"] for d in report["databases"]}
    assert set(outcome) == set(REGIONS)
    assert {k: v["status"] for k, v in outcome.items()} == {
        n: ("failed" if n == FAILING else "succeeded") for n in REGIONS}
    assert outcome[FAILING]["etl"] == "paused" and "change freeze" in outcome[FAILING]["error"]
    assert f"regions: {'; '.join(n + (' failed' if n == FAILING else ' succeeded') for n in REGIONS)}" in res.output

    # The fix, then the same command: the failed region resumes and finishes, the others change nothing.
    admin(failing,
        "DROP EVENT TRIGGER block_photo_ddl; DROP FUNCTION public.block_photo_ddl()")
    again = deploy(regions)
    assert again.rc == 0, again.output[-6000:]
    assert sum(failing.lab.duplicates().values()) == 0
    assert not failing.paused() and failing.lab.current_release() != "releases/v1"
    assert [run[2] for run in failing.ledger_runs() if run[1] == "deploy"] == ["succeeded"]
    for r in others:
        assert again.recap[r.db_host]["changed"] == 0 and again.recap[r.etl_host]["changed"] == 0, again.recap
