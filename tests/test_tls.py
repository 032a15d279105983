"""TLS (issue 18): ``verify-full`` against a server that accepts TLS only, for every client of a deploy.

A throwaway cluster with ``ssl = on``, a self-signed CA and a server certificate for ``localhost`` made here
(python cryptography), and a pg_hba.conf with ``hostssl`` lines only: a client that does not use TLS is refused.
A deploy on a db-only inventory with ``dedup_db_host: localhost``, ``dedup_db_sslmode: verify-full`` and
``dedup_db_sslrootcert`` succeeds, including the pg_dump (which would be refused without PGSSLMODE and the
CA). With a CA that did not sign the server's certificate the run stops in preflight naming the certificate
problem, and nothing changed.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path

import psycopg2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_bad_input import db_only_inventory

from harness import REPO, destroy_cluster, run_playbook, start_cluster

DEPLOY = REPO / "deploy_dedup.yml"
OWNER, PASSWORD, DB = "tls_owner", "tls-Owner-Secret-7", "tlsdb"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _cert(subject_cn: str, key, issuer_cn: str, issuer_key, *, ca: bool, san: list[str] | None = None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path) -> dict[str, Path]:
    """ca.crt signs server.crt (CN and SAN localhost); other-ca.crt signs nothing the server has."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, srv_key = _key(), _key(), _key()
    ca = _cert("dedup test CA", ca_key, "dedup test CA", ca_key, ca=True)
    other = _cert("another CA", other_key, "another CA", other_key, ca=True)
    srv = _cert("localhost", srv_key, "dedup test CA", ca_key, ca=False, san=["localhost"])
    out = {"ca": root / "ca.crt", "other_ca": root / "other-ca.crt", "cert": root / "server.crt",
           "key": root / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["other_ca"].write_bytes(other.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _write_key(srv_key, out["key"])
    os.chmod(root, 0o755)
    return out


@pytest.fixture(scope="module")
def tls_pg():
    pki_dir = Path(tempfile.mkdtemp(prefix="dedup-pki-"))  # the server's user must reach it (pytest's tmp is 0700)
    pki = make_pki(pki_dir)
    if os.geteuid() == 0:  # the server runs as an unprivileged user and must own its key (0600)
        from harness import server_os_user  # noqa: PLC0415

        pw = pwd.getpwnam(server_os_user())
        os.chown(pki["key"], pw.pw_uid, pw.pw_gid)
    cluster = start_cluster(extra_conf={"ssl": "on", "ssl_cert_file": f"'{pki['cert']}'",
                                        "ssl_key_file": f"'{pki['key']}'"})
    try:
        # TLS only over TCP: no plain "host" line, so a client that does not use TLS is refused.
        (cluster.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
        cluster.restart()
        admin = cluster.connect()  # libpq's default sslmode=prefer: TLS
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD %s", (PASSWORD,))
            cur.execute(f"CREATE DATABASE {DB} OWNER {OWNER}")
        admin.close()
        yield cluster, pki
    finally:
        destroy_cluster(cluster)
        shutil.rmtree(pki_dir, ignore_errors=True)


def owner_conn(cluster):
    c = psycopg2.connect(host="127.0.0.1", port=cluster.port, dbname=DB, user=OWNER, password=PASSWORD,
                         sslmode="require")
    c.autocommit = True
    return c


def poisoned_table(c, schema: str) -> int:
    with c.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"CREATE TABLE {schema}.items (id bigserial PRIMARY KEY, k int NOT NULL, v text)")
        for _copy in range(3):  # the ETL bug: every run inserts every row again
            cur.execute(f"INSERT INTO {schema}.items (k, v) SELECT g, 'v' || g FROM generate_series(1, 200) g")
        cur.execute(f"SELECT count(*) FROM {schema}.items")
        return cur.fetchone()[0]


def inventory(tmp_path: Path, cluster, schema: str, rootcert: Path) -> Path:
    return db_only_inventory(
        tmp_path / "inv", port=cluster.port, dbname=DB, user=OWNER, password=PASSWORD, root=tmp_path,
        extra={"dedup_db_host": "localhost", "dedup_db_sslmode": "verify-full",
               "dedup_db_sslrootcert": str(rootcert), "dedup_schema": schema,
               "dedup_backup_schema": f"{schema}_ledger", "dedup_backup_mode": "dump",
               "dedup_tables": [{"name": "items", "natural_key": ["k"]}], "monitor_schedule": False})


def test_plain_connections_are_refused_by_the_tls_only_server(tls_pg):
    cluster, _pki = tls_pg
    with pytest.raises(psycopg2.OperationalError, match="no encryption"):
        psycopg2.connect(host="127.0.0.1", port=cluster.port, dbname=DB, user=OWNER, password=PASSWORD,
                         sslmode="disable").close()


def test_verify_full_deploy_dumps_and_migrates_over_tls(tls_pg, tmp_path):
    cluster, pki = tls_pg
    c = owner_conn(cluster)
    before = poisoned_table(c, "tls_ok")
    res = run_playbook(DEPLOY, inventory=inventory(tmp_path, cluster, "tls_ok", pki["ca"]))
    assert res.rc == 0, res.output[-6000:]
    with c.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT k) FROM tls_ok.items")
        assert cur.fetchone() == (200, 200)
        cur.execute("SELECT dump_path, dump_bytes FROM tls_ok_ledger.runs")
        dump_path, dump_bytes = cur.fetchone()
    c.close()
    assert before == 600
    assert dump_path and Path(dump_path).is_file() and dump_bytes > 0, "no verified dump recorded"
    # the dump went over TLS (the server refuses anything else) to the host name the certificate holds
    assert "localhost" in res.output
    shutil.rmtree(tmp_path / "backups", ignore_errors=True)


def test_a_wrong_ca_stops_in_preflight_naming_the_certificate_problem(tls_pg, tmp_path):
    cluster, pki = tls_pg
    c = owner_conn(cluster)
    before = poisoned_table(c, "tls_bad")
    res = run_playbook(DEPLOY, inventory=inventory(tmp_path, cluster, "tls_bad", pki["other_ca"]))
    out = " ".join(res.output.split())
    assert res.rc != 0, out[-3000:]
    assert "not signed by the CA in " + str(pki["other_ca"]) in out, out[-3000:]
    assert "dedup_db_sslrootcert" in out and "certificate verify failed" in out, out[-3000:]
    plays = re.findall(r"^PLAY \[([^\]]*)\]", res.stdout, re.M)
    assert plays[-1].startswith("Preflight"), plays  # stopped there: no later play started
    with c.cursor() as cur:
        cur.execute("SELECT count(*) FROM tls_bad.items")
        assert cur.fetchone()[0] == before
        cur.execute("SELECT to_regnamespace('tls_bad_ledger') IS NULL")
        assert cur.fetchone()[0], "the ledger was created"
    c.close()
    assert not list((tmp_path / "backups").glob("*")) if (tmp_path / "backups").exists() else True
