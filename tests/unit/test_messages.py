"""Messages that say what to do (issue 18): pure functions of module_utils and the modules, no cluster."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ansible.module_utils

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "module_utils") not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(REPO / "module_utils"))

from ansible.module_utils import dedup_dump, dedup_pg  # noqa: E402  (after the repo's module_utils is visible)


def _library(name: str):
    spec = importlib.util.spec_from_file_location(f"dedup_unit_{name}", REPO / "library" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KW = {"host": "db.example.org", "port": 5432, "dbname": "shop", "user": "owner", "password": "pw-Secret-1",
      "sslmode": "verify-full", "sslrootcert": "/etc/ssl/rds-ca.pem"}


def test_missing_psycopg2_names_the_interpreter_and_what_to_install():
    msg = dedup_pg.missing_psycopg2_message("/opt/venv/bin/python3.11", "No module named 'psycopg2'")
    assert "/opt/venv/bin/python3.11 cannot import it" in msg
    assert "python3-psycopg2" in msg and "/opt/venv/bin/python3.11 -m pip install psycopg2-binary" in msg
    assert "ansible_python_interpreter" in msg
    assert sys.executable in dedup_pg.missing_psycopg2_message(error="x")  # default: the module's own python


def test_certificate_problems_are_named_with_the_setting_to_change():
    cases = {
        "connection to server at \"db.example.org\" (10.0.0.5), port 5432 failed: SSL error: certificate verify "
        "failed": ("not signed by the CA in /etc/ssl/rds-ca.pem", "dedup_db_sslrootcert"),
        "server certificate for \"localhost\" does not match host name \"db.example.org\"":
            ("does not name the host db.example.org", "dedup_db_host"),
        "root certificate file \"/root/.postgresql/root.crt\" does not exist\nEither provide the file":
            ("CA certificate file /etc/ssl/rds-ca.pem is missing", "dedup_db_sslrootcert"),
        "no pg_hba.conf entry for host \"10.0.0.9\", user \"owner\", database \"shop\", no encryption":
            ("only over TLS", "dedup_db_sslmode"),
        "private key file \"/k.key\" has group or world access": ("client certificate or key", "dedup_db_sslkey"),
    }
    for raw, (what, setting) in cases.items():
        msg = dedup_pg.describe_connect_error(Exception(raw), KW)
        assert what in msg and setting in msg and raw.split("\n")[0] in msg, msg
    # not a TLS problem: the old sentences stay
    msg = dedup_pg.describe_connect_error(Exception("password authentication failed for user \"owner\""), KW)
    assert msg.startswith("authentication failed for user owner") and "pw-Secret-1" not in msg


def test_tls_files_reach_psycopg2_and_pg_dump():
    params = {"login_host": "db.example.org", "login_password": "pw", "ssl_mode": "verify-full",
              "connect_timeout": 7, "ssl_rootcert": "/ca.pem", "ssl_cert": "/c.crt", "ssl_key": "/c.key"}
    kw = dedup_pg.conn_params(params)
    assert (kw["sslmode"], kw["sslrootcert"], kw["sslcert"], kw["sslkey"]) == ("verify-full", "/ca.pem", "/c.crt",
                                                                                 "/c.key")
    env = dedup_dump.child_env(params)
    assert (env["PGSSLMODE"], env["PGCONNECT_TIMEOUT"], env["PGSSLROOTCERT"], env["PGSSLCERT"], env["PGSSLKEY"]) \
        == ("verify-full", "7", "/ca.pem", "/c.crt", "/c.key")
    assert "pw" not in " ".join(dedup_dump.connection_args(params))
    unset = dedup_pg.conn_params({"login_host": "h", "ssl_rootcert": "", "ssl_cert": None})
    assert not {"sslrootcert", "sslcert", "sslkey"} & set(unset)  # unset: libpq's defaults / PG* apply
    assert {"ssl_rootcert", "ssl_cert", "ssl_key"} <= set(dedup_pg.pg_common_argument_spec())


def test_planning_failure_says_what_was_planned_and_what_to_check():
    plan = _library("pg_dedup_plan")
    p = {"login_db": "shop", "login_user": "owner", "schema": "sales", "backup_schema": "dedup_rollout"}
    msg = plan.planning_failed("table:orders", "permission denied for table orders", p)
    assert "sales.orders" in msg and "permission denied for table orders" in msg
    assert "Nothing was changed" in msg and "SELECT" in msg and "natural_key" in msg
    msg = plan.planning_failed("ledger", "relation \"dedup_rollout.runs\" has no column x", p)
    assert "ledger dedup_rollout.runs" in msg and "dedup_backup_schema" in msg
    for stage in ("server", "neighbours", "connecting"):
        assert plan.planning_failed(stage, "boom", p).startswith("planning the deploy failed while ")
