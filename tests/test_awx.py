"""AWX / Automation Platform (issue 16): the project run through ansible-runner as AWX lays it out.

A private data dir with the project (the repository's tracked files) in ``project/``, the inventory in
``inventory/``, the password as an environment variable (how AWX injects a credential) and AWX's own
``requirements_roles`` first in ANSIBLE_ROLES_PATH. Before, every path was derived from the first roles path, so
such a run failed with "template file .../sql/ledger.sql.j2 could not be found". The run's summary must reach
AWX as ``set_stats`` data (the ``artifact_data`` of the playbook_on_stats event).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ansible_runner
import psycopg2
import yaml
from psycopg2 import sql

from harness import REPO, VENV_BIN

OWNER = "breezeway"  # the lab's non-superuser role (cluster-wide)


def project_copy(dest) -> None:
    """The repository's tracked files, as an SCM checkout of the project would be."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def test_deploy_through_ansible_runner_laid_out_as_awx(pg, fresh_db, lab_template, tmp_path, monkeypatch):
    admin = pg.connect(fresh_db)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(fresh_db),
                                                                        sql.Identifier(OWNER)))
        cur.execute(sql.SQL("CREATE SCHEMA app AUTHORIZATION {}").format(sql.Identifier(OWNER)))
    admin.close()
    c = psycopg2.connect(**pg.dsn(fresh_db, user=OWNER, password=lab_template.password))
    c.autocommit = True
    with c.cursor() as cur:
        cur.execute("CREATE TABLE app.items (id bigserial PRIMARY KEY, k int NOT NULL, v text)")
        cur.execute("INSERT INTO app.items (k, v) SELECT g % 50, 'v' || (g % 50) FROM generate_series(1, 400) g")

    pdd = tmp_path / "awx"
    project_copy(pdd / "project")
    (pdd / "requirements_roles" / "some_collection_role" / "tasks").mkdir(parents=True)
    (pdd / "requirements_roles" / "some_collection_role" / "tasks" / "main.yml").write_text("---\n[]\n")
    (pdd / "inventory" / "group_vars" / "all").mkdir(parents=True)
    hosts = {"all": {"children": {"db": {"hosts": {"awx-db": None}}, "etl": {"hosts": {}}},
                     "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}
    (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (pdd / "inventory" / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump({
        "dedup_db_host": "127.0.0.1", "dedup_db_port": pg.port, "dedup_db_name": fresh_db, "dedup_db_user": OWNER,
        "dedup_schema": "app", "dedup_tables": [{"name": "items", "natural_key": ["k"]}],
        "dedup_backup_dir": str(tmp_path / "backups"), "dedup_report_root": str(tmp_path / "reports"),
        "monitor_schedule": False,  # the scheduled check writes system paths (/etc/cron.d ...)
    }))
    monkeypatch.setenv("PATH", f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    envvars = {
        "DEDUP_DB_PASSWORD": lab_template.password,  # a credential, injected as AWX does
        "ANSIBLE_ROLES_PATH": f"{pdd / 'requirements_roles'}:{pdd / 'project' / 'roles'}",
        "ANSIBLE_CONFIG": str(pdd / "project" / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
    }
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="deploy_dedup.yml", envvars=envvars, quiet=True,
                           timeout=900)
    out = r.stdout.read()
    assert r.status == "successful" and r.rc == 0, out[-6000:]
    assert lab_template.password not in out
    with c.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT k) FROM app.items")
        assert cur.fetchone() == (50, 50)
    c.close()
    stats = [e for e in r.events if e.get("event") == "playbook_on_stats"]
    summary = stats[-1]["event_data"].get("artifact_data", {}).get("dedup_summary")
    assert summary, stats[-1]["event_data"]
    assert "items" in str(summary)
