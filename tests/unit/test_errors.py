"""Connection and pg_dump failures described in a sentence, the password scrubbed (pure, no cluster):
module_utils/dedup_pg.py describe_connect_error / describe_tls_error / error_text / scrub and
module_utils/dedup_dump.py describe_failure."""

from __future__ import annotations

import pytest
from _load import module_util

pg = module_util("dedup_pg")
dump = module_util("dedup_dump")

KW = {"host": "db.example", "port": 5432, "user": "dedup", "dbname": "breezeway", "password": "s3cr3t",
      "connect_timeout": 10, "sslmode": "prefer"}


@pytest.mark.parametrize(("libpq", "head"), [
    ('FATAL:  password authentication failed for user "dedup" (password s3cr3t)',
     "authentication failed for user dedup at db.example:5432: wrong password or user"),
    ("fe_sendauth: no password supplied", "requires a password for user dedup and none was given"),
    ('FATAL:  database "breezeway" does not exist', "database breezeway does not exist on the server at"),
    ('FATAL:  role "dedup" does not exist', "role (user) dedup does not exist"),
    ('could not translate host name "db.example" to address: Name or service not known',
     "unknown host: db.example cannot be resolved"),
    ("connection to server at \"db.example\", port 5432 failed: Connection refused",
     "cannot reach PostgreSQL at db.example:5432: connection refused"),
    ("timeout expired", "connection timed out after 10s"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "dedup", database "breezeway", no encryption',
     "accepts this user/database only over TLS (hostssl)"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "dedup", database "breezeway", SSL encryption',
     "refuses user dedup / database breezeway (no pg_hba.conf entry)"),
    ("server certificate for \"x\" does not match host name \"db.example\"", "does not name the host db.example"),
    ("SSL error: certificate verify failed", "is not signed by the CA in"),
    ("server does not support SSL, but SSL was required", "does not offer TLS but ssl_mode=prefer requires it"),
    ("something nobody expected", "cannot connect to PostgreSQL at db.example:5432 as dedup, database breezeway"),
])
def test_connect_error_sentence(libpq, head):
    text = pg.describe_connect_error(Exception(libpq), KW)
    assert head in text
    assert "libpq said: " in text
    assert "s3cr3t" not in text


def test_connect_error_socket_and_defaults():
    text = pg.describe_connect_error(Exception("No such file or directory"), {"host": "/var/run/postgresql"})
    assert "unix socket in /var/run/postgresql" in text and "no server socket there" in text
    text = pg.describe_connect_error(Exception("Connection refused"), {})
    assert "(libpq default host / PGHOST)" in text


def test_tls_error_is_none_for_other_errors():
    assert pg.describe_tls_error("connection refused", KW) is None


def test_scrub():
    assert pg.scrub("pw=abc abc", "abc") == "pw=******** ********"
    assert pg.scrub("unchanged", "") == "unchanged"
    assert pg.scrub(None, "x") is None


class _Err(Exception):
    pgerror = "ERROR:  permission denied for table t (password hunter2)\n"


class _Module:
    params = {"login_password": "hunter2"}


def test_error_text_prefers_pgerror_and_scrubs():
    assert pg.error_text(_Err("ignored"), _Module()) == "ERROR:  permission denied for table t (password ********)"
    assert pg.error_text(ValueError(" plain "), None) == "plain"


@pytest.mark.parametrize(("stderr", "hint"), [
    ("pg_dump: error: query failed: ERROR:  permission denied for table t", "the database role lacks a privilege"),
    ("pg_dump: error: could not write to output file: No space left on device", "filesystem is full"),
    ("pg_dump: error: aborting because of server version mismatch", "does not match the server's"),
    ('pg_dump: error: connection to server at "h" failed: password authentication failed', "could not connect"),
    ("pg_dump: error: something else", "see the message"),
    ("", "see the message"),
])
def test_dump_failure_sentence(stderr, hint):
    text = dump.describe_failure("pg_dump of breezeway", stderr + " (pw s3cr3t)", "s3cr3t")
    assert text.startswith("pg_dump of breezeway failed (")
    assert hint in text
    assert "s3cr3t" not in text


def test_dump_failure_keeps_the_end_of_a_long_message():
    text = dump.describe_failure("pg_restore", "x" * 5000 + "THE END")
    assert text.endswith("THE END") and len(text) < 2200


def test_dump_failure_without_message():
    assert dump.describe_failure("pg_dump", "").endswith("(no message)")
