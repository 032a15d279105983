"""Bad input (issue 10): every case stops with a clear error naming the problem, and nothing changed.

"Nothing changed" is asserted on the catalog (relations, constraints, no ledger schema), the row
counts, the ETL user's crontab and the backup directory. Hostile but legal identifiers (quotes,
spaces, upper case, reserved words) are deduplicated and constrained end to end. Real cluster, real
ansible-playbook, a real standby made with pg_basebackup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
import yaml
from psycopg2 import sql
from test_deploy import DEPLOY, LEDGER, ledger_exists, unique_constraints

from harness import VENV_BIN, as_user, free_port, run_playbook, wait_for
from modkit import pg_args, run_module

# --------------------------------------------------------------------------- helpers


def catalog(conn_factory) -> list[tuple]:
    """Every user relation and constraint, with its kind: what "the catalog did not change" compares."""
    c = conn_factory()
    try:
        with c.cursor() as cur:
            cur.execute(
                "SELECT n.nspname, c.relname, c.relkind::text, coalesce(con.conname, '') "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_constraint con ON con.conrelid = c.oid "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' "
                "ORDER BY 1, 2, 4"
            )
            return cur.fetchall()
    finally:
        c.close()


class Unchanged:
    """Snapshot of catalog, counts, crontab and backup dir; ``assert_same()`` after each refused run."""

    def __init__(self, lab):
        self.lab = lab
        self.catalog = catalog(lab.admin_conn)
        self.counts = lab.counts()
        self.cron = lab.crontab()
        self.cons = unique_constraints(lab)

    def assert_same(self, what: str) -> None:
        lab = self.lab
        assert catalog(lab.admin_conn) == self.catalog, f"{what}: the catalog changed"
        assert lab.counts() == self.counts, f"{what}: rows changed"
        assert unique_constraints(lab) == self.cons, f"{what}: constraints changed"
        assert lab.crontab() == self.cron, f"{what}: the crontab changed"
        assert not any(lab.backup_dir.iterdir()), f"{what}: something was written to the backup dir"
        assert not ledger_exists(lab), f"{what}: the ledger schema was created"


def vault_encrypt_file(path: Path, vault_pass_file: Path) -> None:
    """Encrypt a whole vars file in place with ansible-vault."""
    subprocess.run([str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(vault_pass_file),
                    str(path)], capture_output=True, text=True, check=True)


def db_only_inventory(path: Path, *, port: int, dbname: str, user: str, password: str, root: Path,
                      extra: dict | None = None) -> Path:
    """An inventory with a db host and an empty etl group (no ETL on the target)."""
    (path / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    hosts = {"all": {
        "children": {"db": {"hosts": {"odd-db": None}}, "etl": {"hosts": {}}},
        "vars": {"ansible_connection": "local", "ansible_host": "localhost",
                 "ansible_python_interpreter": sys.executable},
    }}
    main = {"dedup_db_host": "127.0.0.1", "dedup_db_port": port, "dedup_db_name": dbname, "dedup_db_user": user,
            "dedup_backup_dir": str(root / "backups"), "dedup_report_root": str(root / "reports"),
            # The scheduled check writes system paths (/etc/cron.d ...): off, as in labkit's inventories.
            "monitor_schedule": False}
    main.update(extra or {})
    (path / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    (path / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))
    secret = path / "group_vars" / "all" / "secret.yml"
    secret.touch(mode=0o600)
    secret.write_text(yaml.safe_dump({"dedup_db_password": password}))
    return path


# --------------------------------------------------------------------------- catalog refusals (module level)


def test_plan_refuses_missing_schema_fk_target_partitioned_and_inherited(lab):
    """pg_dedup_plan (preflight's first task) names each problem; the playbook path is the same as for a
    missing table (tests/test_deploy.py), so the module is exercised directly here."""
    c = lab.conn()
    with c.cursor() as cur:
        cur.execute("CREATE TABLE breezeway.part_t (id bigserial, k int NOT NULL, PRIMARY KEY (id, k)) "
                    "PARTITION BY RANGE (k)")
        cur.execute("CREATE TABLE breezeway.part_t_1 PARTITION OF breezeway.part_t FOR VALUES FROM (0) TO (100)")
        cur.execute("CREATE TABLE breezeway.inh_parent (id bigserial PRIMARY KEY, k int)")
        cur.execute("CREATE TABLE breezeway.inh_child () INHERITS (breezeway.inh_parent)")
        cur.execute("CREATE VIEW breezeway.a_view AS SELECT 1 AS k, 1 AS id")
    c.close()
    before = catalog(lab.admin_conn)
    conn = pg_args(lab.pg, lab.dbname, login_user=lab.db_user, login_password=lab.password)
    cases = [
        ("no_such_schema", {"name": "task_photos", "natural_key": ["task_pk", "photo_id"]},
         'schema "no_such_schema" does not exist in database'),
        ("breezeway", {"name": "tasks", "natural_key": ["region_code", "source_id"]},
         'table "breezeway"."tasks" is referenced by foreign keys of other tables'),
        # a partitioned table is planned when its key holds the partition key (tests/test_shapes.py), not otherwise
        ("breezeway", {"name": "part_t", "natural_key": ["id"], "order_by": "id"}, "does not contain k"),
        ("breezeway", {"name": "part_t_1", "natural_key": ["k"], "order_by": "id"}, "is a partition of"),
        ("breezeway", {"name": "inh_parent", "natural_key": ["k"]}, "takes part in table inheritance"),
        ("breezeway", {"name": "inh_child", "natural_key": ["k"]}, "takes part in table inheritance"),
        ("breezeway", {"name": "a_view", "natural_key": ["k"]}, "is a view, not a table"),
        ("breezeway", {"name": "task_photos", "natural_key": ["task_pk", "photo_id"], "keep": "middle"},
         "keep must be oldest or newest"),
    ]
    for schema, spec, expected in cases:
        res = run_module("pg_dedup_plan", {**conn, "schema": schema, "tables": [spec], "run_id": "t1"})
        assert res.get("failed"), (spec, res)
        assert expected in res["msg"], (expected, res["msg"])
        assert lab.password not in str(res)
    assert catalog(lab.admin_conn) == before


# --------------------------------------------------------------------------- refusals through the playbook


def test_bad_targets_refused_through_the_playbook_change_nothing(lab, tmp_path):
    """Missing database, a role without privileges, NULL keys on a server "older than 15", a vault file that
    cannot be decrypted: a clear error, nothing changed. (Missing schema, FK target, partitioned and
    inherited tables fail in the same first task: module-level above.)"""
    c = lab.conn()
    with c.cursor() as cur:  # NULL keys, for the "server older than 15" case
        cur.execute("ALTER TABLE breezeway.task_comments ALTER COLUMN comment_id DROP NOT NULL")
        cur.execute("INSERT INTO breezeway.task_comments (task_pk, comment_id, body) "
                    "SELECT task_pk, NULL, 'no id' FROM breezeway.task_comments LIMIT 2")
    c.close()
    weak_pw = "weak-Role-pw-" + os.urandom(4).hex()
    admin = lab.admin_conn()
    with admin.cursor() as cur:  # a role that can read the tables but neither own nor change them
        cur.execute(sql.SQL("CREATE ROLE dedup_weak LOGIN PASSWORD {}").format(sql.Literal(weak_pw)))
        cur.execute("GRANT USAGE ON SCHEMA breezeway TO dedup_weak")
        cur.execute("GRANT SELECT ON ALL TABLES IN SCHEMA breezeway TO dedup_weak")
    admin.close()
    # A vault-encrypted password that the given vault password cannot open.
    vault_inv = tmp_path / "vaulted"
    shutil.copytree(lab.inventory, vault_inv)
    (vault_inv / "group_vars" / "all" / "secret.yml").unlink()
    right, wrong = tmp_path / "right-pass", tmp_path / "wrong-pass"
    right.write_text("the-right-vault-pass\n")
    wrong.write_text("a-wrong-vault-pass\n")
    for f in (right, wrong):
        os.chmod(f, 0o600)
    vault_file = vault_inv / "group_vars" / "all" / "vault.yml"
    vault_file.write_text(yaml.safe_dump({"dedup_db_password": lab.password}))
    vault_encrypt_file(vault_file, right)
    assert lab.password not in vault_file.read_text()

    state = Unchanged(lab)
    cases = [
        ("missing database", {"dedup_db_name": "no_such_database"}, (), None,
         "database no_such_database does not exist"),
        ("no privileges", {"dedup_db_user": "dedup_weak", "dedup_db_password": weak_pw}, (), None,
         "dedup_weak cannot migrate breezeway.task_requirements: missing privilege INSERT, DELETE, TRUNCATE;"),
        ("NULL keys before 15", {"preflight_server_version_num_override": 140010}, (), None,
         "breezeway.task_comments has 2 rows with NULL in the natural key (comment_id)"),
        ("undecryptable vault", {}, ("--vault-password-file", str(wrong)), vault_inv, "Decryption failed"),
    ]
    try:
        for what, extra, args, inv, expected in cases:
            res = run_playbook(DEPLOY, *args, inventory=inv or lab.inventory, extra_vars=extra or None)
            assert res.rc != 0, f"{what}: should fail"
            assert expected in res.output, (what, expected, res.output[-3000:])
            for secret in (lab.password, weak_pw):
                assert secret not in res.output, f"{what}: a password reached the output"
            if what == "no privileges":
                assert "it must own the table" in res.output
            if what == "NULL keys before 15":
                assert "Server is 140010" in res.output and "upgrade to 15+" in res.output
            state.assert_same(what)
    finally:
        admin = lab.admin_conn()
        with admin.cursor() as cur:
            cur.execute("DROP OWNED BY dedup_weak")
            cur.execute("DROP ROLE dedup_weak")
        admin.close()
    # The same vault opens with the right password (the case above failed on decryption, not the setup).
    ok = subprocess.run([str(VENV_BIN / "ansible-vault"), "view", "--vault-password-file", str(right),
                         str(vault_inv / "group_vars" / "all" / "vault.yml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "dedup_db_password" in ok.stdout


# --------------------------------------------------------------------------- a standby


@pytest.fixture
def standby(lab):
    """A streaming standby of the harness cluster (pg_basebackup -R), on its own port, as the same OS user."""
    pg = lab.pg
    root = Path(tempfile.mkdtemp(prefix="dedup-standby-"))
    os.chmod(root, 0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if pg.os_user:
        shutil.chown(root, pg.os_user, pg.os_user)
        shutil.chown(sock, pg.os_user, pg.os_user)
    env = dict(os.environ, PGPASSWORD=pg.password)
    port = free_port()
    subprocess.run(as_user([str(pg.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(pg.port), "-U",
                            pg.superuser, "-D", str(data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"],
                           pg.os_user),
                   check=True, capture_output=True, text=True, env=env, timeout=300)
    with open(data / "postgresql.auto.conf", "a") as fh:
        fh.write(f"port = {port}\nunix_socket_directories = '{sock}'\nhot_standby = on\n")
    subprocess.run(as_user([str(pg.bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start"],
                           pg.os_user), check=True, capture_output=True, text=True, timeout=120)
    try:
        yield port
    finally:
        subprocess.run(as_user([str(pg.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                               pg.os_user), capture_output=True, text=True)
        shutil.rmtree(root, ignore_errors=True)


def test_standby_is_refused(lab, standby):
    def streaming():
        c = psycopg2.connect(**{**lab.pg.dsn(lab.dbname), "port": standby})
        try:
            with c.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                return cur.fetchone()[0]
        finally:
            c.close()

    assert wait_for(streaming, timeout=60)
    state = Unchanged(lab)
    res = lab.playbook(DEPLOY, extra_vars={"dedup_db_port": standby})
    assert res.rc != 0
    assert f"{lab.dbname} on 127.0.0.1:{standby} is a standby (pg_is_in_recovery() is true)" in res.output, \
        res.output[-3000:]
    assert lab.password not in res.output
    state.assert_same("standby")


# --------------------------------------------------------------------------- hostile but legal identifiers


ODD_SCHEMA = 'Odd "Schema"'
ODD_TABLE = "Task Photos"
ODD_KEY = ["Task PK", "select"]


def test_quoted_spaced_upper_case_reserved_identifiers_end_to_end(pg, fresh_db, lab_template, tmp_path):
    """A schema with a quote and a space, a table "Task Photos", key columns "Task PK" and "select": the whole
    deploy deduplicates, backs up and constrains it, and a second run changes nothing."""
    owner = "breezeway"  # the lab's non-superuser owner role (exists cluster-wide)
    admin = pg.connect(fresh_db)
    with admin.cursor() as cur:
        cur.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(fresh_db),
                                                                        sql.Identifier(owner)))
        cur.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(ODD_SCHEMA),
                                                                         sql.Identifier(owner)))
    admin.close()
    c = psycopg2.connect(**pg.dsn(fresh_db, user=owner, password=lab_template.password))
    c.autocommit = True
    t = sql.Identifier(ODD_SCHEMA, ODD_TABLE)
    with c.cursor() as cur:
        cur.execute(sql.SQL('CREATE TABLE {} ("ID" bigserial PRIMARY KEY, "Task PK" int NOT NULL, '
                            '"select" text NOT NULL, "Order" text, created_at timestamptz DEFAULT now())').format(t))
        cur.execute(sql.SQL('INSERT INTO {} ("Task PK", "select", "Order") '
                            "SELECT g % 7, 'v' || (g % 3), 'same' FROM generate_series(1, 200) g").format(t))
        cur.execute(sql.SQL("SELECT count(*), count(DISTINCT (\"Task PK\", \"select\")) FROM {}").format(t))
        total, uniq = cur.fetchone()
    c.close()
    assert total == 200 and uniq == 21
    inv = db_only_inventory(tmp_path / "odd", port=pg.port, dbname=fresh_db, user=owner,
                            password=lab_template.password, root=tmp_path,
                            extra={"dedup_schema": ODD_SCHEMA, "dedup_forbid_superuser": True,
                                   "dedup_tables": [{"name": ODD_TABLE, "natural_key": ODD_KEY}]})
    res = run_playbook(DEPLOY, inventory=inv)
    assert res.rc == 0, res.output[-5000:]

    c = pg.connect(fresh_db)
    with c.cursor() as cur:
        backup = sql.Identifier(LEDGER, f"{ODD_TABLE}__{_deploy_id(cur)}")
        cur.execute(sql.SQL('SELECT count(*), count(DISTINCT ("Task PK", "select")), '
                            'bool_and("ID" = (SELECT min(b."ID") FROM (SELECT "ID", "Task PK", "select" FROM {t} '
                            'UNION ALL SELECT "ID", "Task PK", "select" FROM {b}) b '
                            'WHERE (b."Task PK", b."select") = (x."Task PK", x."select"))) FROM {t} x').format(
            t=t, b=backup))
        rows, keys, oldest = cur.fetchone()
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(backup))
        backed_up = cur.fetchone()[0]
        cur.execute("SELECT c.conname, ARRAY(SELECT a.attname::text FROM unnest(c.conkey) k JOIN pg_attribute a "
                    "ON a.attrelid = c.conrelid AND a.attnum = k ORDER BY 1) FROM pg_constraint c "
                    "WHERE c.conrelid = %s::regclass AND c.contype = 'u'", (t.as_string(cur),))
        cons = cur.fetchall()
    c.close()
    assert (rows, keys, oldest) == (21, 21, True)
    assert backed_up == 200 - 21
    assert len(cons) == 1 and sorted(cons[0][1]) == sorted(ODD_KEY), cons
    again = run_playbook(DEPLOY, inventory=inv)
    assert again.rc == 0 and again.changed() == 0, again.output[-3000:]


def _deploy_id(cur) -> str:
    cur.execute(sql.SQL("SELECT run_id FROM {} WHERE kind = 'deploy'").format(sql.Identifier(LEDGER, "runs")))
    return cur.fetchone()[0]

