"""Shared PostgreSQL code for the dedup-rollout modules (pg_duplicates, pg_unique_constraint).

One way to connect (libpq semantics: unset options fall back to PG* variables and ~/.pgpass),
DBA-readable connection errors that never carry the password, identifier validation, catalog
look-ups (tables, columns, keys, foreign keys, triggers, equivalent unique constraints/indexes).
All SQL is composed with psycopg2.sql; nothing is string-formatted.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import sys
import time

from ansible.module_utils.dedup_ident import MAX_IDENTIFIER_BYTES, SQL_LOOKING, identifier_problem  # noqa: F401

try:
    import psycopg2
    import psycopg2.errors  # noqa: F401  (exposes psycopg2.errors.* lookups)
    from psycopg2 import sql

    HAS_PSYCOPG2 = True
    PSYCOPG2_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only on hosts without psycopg2
    psycopg2 = None
    sql = None
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMPORT_ERROR = exc

SSL_MODES = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
APP_PREFIX = "dedup-rollout/"
# Module option -> libpq keyword (and the PG* variable pg_dump gets) of the TLS files.
SSL_FILES = (("ssl_rootcert", "sslrootcert"), ("ssl_cert", "sslcert"), ("ssl_key", "sslkey"))


class DedupPgError(Exception):
    """A problem the caller reports with fail_json (message is DBA-readable, secret-free)."""


# --------------------------------------------------------------------------- connection


def utc_iso(value):
    """A datetime as 'YYYY-MM-DDTHH:MM:SSZ' (UTC); anything else as it is."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def relation_exists(cur, schema, name):
    """Whether schema.name exists (any relation kind), both taken as plain names."""
    cur.execute("SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, name))
    return bool(cur.fetchone()[0])


def run_lock_app_name(run_id):
    """application_name of the pg_run_lock holder session of ``run_id``."""
    return ("%slock run=%s" % (APP_PREFIX, run_id))[:63]


def busy_sessions(cur):
    """Other dedup-rollout sessions still working in this database (e.g. the migration of a killed play, which goes
    on until its transaction ends); the run lock's holder does not count. One dict each: pid, application, state,
    xact_seconds, query (its first 120 characters)."""
    cur.execute(
        "SELECT pid, application_name, state, extract(epoch FROM now() - xact_start)::int, "
        "left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 120) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'dedup-rollout/%%' "
        "AND application_name NOT LIKE 'dedup-rollout/lock%%' AND state IS DISTINCT FROM 'idle' ORDER BY 1"
    )
    return [{"pid": r[0], "application": r[1], "state": r[2], "xact_seconds": r[3], "query": r[4]}
            for r in cur.fetchall()]


def run_lock_alive(cur, run_id):
    """Whether the pg_run_lock holder of ``run_id`` is still connected (the play that took it is alive)."""
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE application_name = %s)",
                (run_lock_app_name(run_id),))
    return bool(cur.fetchone()[0])


class PlayWatch:
    """Tells a long-running module that the play which started it is gone (killed): its parent process changed
    (local runs) or the session of its pg_run_lock holder (``run_lock_id``) left, looked up at most every
    ``every`` seconds. A killed play's module must not go on changing tables behind a re-run or a rollback.

    Over SSH the module's parent (the shell under sudo/su) outlives a killed controller, so the holder is what
    tells: it follows the sshd process of the play's SSH connection and lets the lock go when that connection
    closes (docs/operations.md, "The run lock over SSH")."""

    def __init__(self, run_lock_id, every=2.0):
        self.parent = os.getppid()
        self.run_lock_id = run_lock_id
        self.every = every
        self._checked = float("-inf")

    def gone(self, cur):
        """True once the play is gone; ``cur`` (autocommit or inside a transaction) runs the look-up."""
        if os.getppid() != self.parent:
            return True
        if not self.run_lock_id or time.monotonic() - self._checked < self.every:
            return False
        self._checked = time.monotonic()
        return not run_lock_alive(cur, self.run_lock_id)


def pg_common_argument_spec():
    """Connection options shared by the database modules (unset = libpq default / PG* env / .pgpass)."""
    return dict(
        login_host=dict(type="str", default="", aliases=["host", "db_host"]),
        login_port=dict(type="int", aliases=["port", "db_port"]),
        login_db=dict(type="str", aliases=["db", "database", "db_name"]),
        login_user=dict(type="str", aliases=["user", "db_user"]),
        login_password=dict(type="str", no_log=True, aliases=["password", "db_password"]),
        ssl_mode=dict(type="str", default="prefer", aliases=["sslmode"], choices=SSL_MODES),
        connect_timeout=dict(type="int", default=10),
        ssl_rootcert=dict(type="path", aliases=["sslrootcert", "ca_cert"]),
        ssl_cert=dict(type="path", aliases=["sslcert"]),
        ssl_key=dict(type="path", aliases=["sslkey"], no_log=False),
    )


def scrub(text, secret, replacement="********"):
    """Return ``text`` with every occurrence of ``secret`` replaced (no-op for an empty secret)."""
    if text is None:
        return text
    text = str(text)
    if secret:
        text = text.replace(str(secret), replacement)
    return text


def conn_params(params):
    """psycopg2.connect() keyword arguments: only what is set, so libpq applies PG*/.pgpass for the rest."""
    out = {}
    host = params.get("login_host")
    if host:
        out["host"] = host
    if params.get("login_port"):
        out["port"] = int(params["login_port"])
    if params.get("login_db"):
        out["dbname"] = params["login_db"]
    if params.get("login_user"):
        out["user"] = params["login_user"]
    if params.get("login_password"):
        out["password"] = params["login_password"]
    if params.get("ssl_mode"):
        out["sslmode"] = params["ssl_mode"]
    if params.get("connect_timeout") is not None and int(params["connect_timeout"]) > 0:
        out["connect_timeout"] = int(params["connect_timeout"])
    for opt, key in SSL_FILES:
        if params.get(opt):
            out[key] = params[opt]
    return out


def _where(kw):
    host = kw.get("host") or "(libpq default host / PGHOST)"
    port = kw.get("port") or "(default port / PGPORT)"
    if str(host).startswith("/"):
        where = f"unix socket in {host} port {port}"
    else:
        where = f"{host}:{port}"
    return where


def describe_tls_error(low, kw):
    """The certificate or TLS problem a libpq message (lower case) names, with what to set; None if not one."""
    where = _where(kw)
    mode = kw.get("sslmode") or "(PGSSLMODE)"
    ca = kw.get("sslrootcert") or "(libpq default ~/.postgresql/root.crt / PGSSLROOTCERT)"
    if "does not match host name" in low:
        return (f"TLS: the server certificate of {where} does not name the host {kw.get('host')} "
                f"(ssl_mode={mode} checks the name): set dedup_db_host (login_host) to a name the certificate "
                "holds (CN or subjectAltName), or use ssl_mode verify-ca")
    if "root certificate file" in low and ("does not exist" in low or "could not read" in low):
        return (f"TLS: the CA certificate file {ca} is missing or unreadable (ssl_mode={mode} verifies the "
                "server): set dedup_db_sslrootcert (ssl_rootcert) to the CA bundle of the server's certificate")
    if "certificate verify failed" in low or "self-signed certificate" in low or "unable to get local issuer" in low:
        return (f"TLS: the server certificate of {where} is not signed by the CA in {ca} (certificate verify "
                f"failed, ssl_mode={mode}): set dedup_db_sslrootcert (ssl_rootcert) to the CA that issued the "
                "server's certificate (RDS/Cloud SQL: the provider's CA bundle)")
    if "certificate" in low and ("expired" in low or "not yet valid" in low):
        return f"TLS: a certificate is expired or not yet valid ({where}, ssl_mode={mode})"
    if "private key file" in low or "certificate file" in low:
        return ("TLS: the client certificate or key cannot be used (check dedup_db_sslcert / dedup_db_sslkey "
                "(ssl_cert / ssl_key): readable, the key 0600 and owned by the user running the module)")
    if "server does not support ssl" in low:
        return f"TLS: the server at {where} does not offer TLS but ssl_mode={mode} requires it"
    if "no pg_hba.conf entry" in low and "no encryption" in low:
        return (f"the server at {where} accepts this user/database only over TLS (hostssl) and "
                f"ssl_mode={mode} did not use it: set dedup_db_sslmode to require, verify-ca or verify-full")
    return None


def describe_connect_error(exc, kw):
    """Turn a libpq connection failure into a sentence a DBA can act on (password scrubbed)."""
    secret = kw.get("password")
    raw = scrub(str(exc).strip(), secret)
    low = raw.lower()
    where = _where(kw)
    user = kw.get("user") or "(default user / PGUSER)"
    db = kw.get("dbname") or "(default database / PGDATABASE)"
    tls = describe_tls_error(low, kw)
    if tls:
        head = tls
    elif "password authentication failed" in low or "authentication failed" in low:
        head = (f"authentication failed for user {user} at {where}: wrong password or user "
                "(check login_password, PGPASSWORD or ~/.pgpass)")
    elif "no password supplied" in low or "fe_sendauth" in low:
        head = (f"the server at {where} requires a password for user {user} and none was given "
                "(set login_password, PGPASSWORD or ~/.pgpass)")
    elif "does not exist" in low and "database" in low:
        head = f"database {db} does not exist on the server at {where}"
    elif "role" in low and "does not exist" in low:
        head = f"role (user) {user} does not exist on the server at {where}"
    elif "could not translate host name" in low or "name or service not known" in low:
        head = "unknown host: {} cannot be resolved".format(kw.get("host"))
    elif "connection refused" in low:
        head = (f"cannot reach PostgreSQL at {where}: connection refused (server down, wrong port, "
                "or not listening on that address)")
    elif "timeout expired" in low or "timed out" in low:
        head = "cannot reach PostgreSQL at {}: connection timed out after {}s".format(where, kw.get("connect_timeout"))
    elif "no such file or directory" in low:
        head = f"cannot reach PostgreSQL at {where}: no server socket there"
    elif "no pg_hba.conf entry" in low:
        head = f"the server at {where} refuses user {user} / database {db} (no pg_hba.conf entry)"
    elif "ssl" in low:
        head = "SSL negotiation with {} failed (ssl_mode={})".format(where, kw.get("sslmode"))
    else:
        head = f"cannot connect to PostgreSQL at {where} as {user}, database {db}"
    return f"{head}. libpq said: {raw}"


def missing_psycopg2_message(executable=None, error=None):
    """What to install, and for which interpreter, when psycopg2 cannot be imported on the target."""
    python = executable or sys.executable or "python3"
    return (f"the python psycopg2 library is required on the target but {python} cannot import it "
            f"({error or PSYCOPG2_IMPORT_ERROR}): install it for that interpreter, e.g. the OS package "
            f"python3-psycopg2 (apt/dnf) when it is the system python, or `{python} -m pip install "
            "psycopg2-binary`; or point ansible_python_interpreter at a python that has it")


def connect(module, autocommit=False, application_name=None, readonly=False):
    """Connect with the module's connection options; fail_json with a readable, secret-free message."""
    if not HAS_PSYCOPG2:
        module.fail_json(msg=missing_psycopg2_message())
    kw = conn_params(module.params)
    name = application_name or getattr(module, "_name", None) or "module"
    kw["application_name"] = (APP_PREFIX + str(name))[:63]
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.Error as exc:
        module.fail_json(msg=describe_connect_error(exc, kw))
    except Exception as exc:  # e.g. invalid DSN values
        module.fail_json(msg="cannot connect to PostgreSQL: {}".format(scrub(exc, kw.get("password"))))
    if readonly:
        conn.set_session(readonly=True)
    conn.autocommit = autocommit
    return conn


def error_text(exc, module=None):
    """Error text of a psycopg2 exception, with the module's password scrubbed."""
    secret = module.params.get("login_password") if module is not None else None
    msg = getattr(exc, "pgerror", None) or str(exc)
    return scrub(msg.strip(), secret)


def server_version_num(cur):
    cur.execute("SELECT current_setting('server_version_num')::int")
    return cur.fetchone()[0]


# --------------------------------------------------------------------------- identifiers


def _fail(module, msg):
    if module is not None:
        module.fail_json(msg=msg)
    raise DedupPgError(msg)


def validate_identifier(name, what, module=None):
    """Refuse names that cannot be PostgreSQL identifiers or look like SQL; return the name unchanged.

    Quotes, spaces, upper case and reserved words are legal: they are quoted with sql.Identifier. The rule is
    module_utils/dedup_ident.py's (shared with the pg_ident filter); the messages are these.
    """
    problem = identifier_problem(name)
    if problem is None:
        return name
    reason, detail = problem
    if reason == "empty":
        return _fail(module, f"{what} name is empty or not a string: {name!r}")
    if reason == "nul":
        return _fail(module, f"{what} name {name!r} contains a NUL byte")
    if reason == "sql":
        return _fail(module, f"{what} name {name!r} looks like SQL (contains {detail!r}): refused; "
                             f"give the plain name of the {what} as it appears in the catalog")
    return _fail(module, f"{what} name {name!r} is longer than PostgreSQL's "
                         f"{MAX_IDENTIFIER_BYTES}-byte identifier limit")


def qualified(schema, table):
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def fit_name(name, limit=MAX_IDENTIFIER_BYTES):
    """Shorten ``name`` to ``limit`` bytes with a short hash suffix when it is too long."""
    if len(name.encode("utf-8")) <= limit:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    keep = name.encode("utf-8")[: limit - len(digest) - 1].decode("utf-8", "ignore")
    return f"{keep}_{digest}"


def _truncated_list(items, limit=20):
    items = list(items)
    if not items:
        return "(none)"
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


RELKIND_NAMES = {
    "r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "i": "index",
    "S": "sequence", "f": "foreign table", "c": "composite type", "t": "TOAST table", "I": "partitioned index",
}


def get_table(cur, schema, table, module=None, refuse_partitioned=False, refuse_inheritance=False):
    """Look a table up in the catalog; fail naming what is missing. Returns a dict describing it."""
    validate_identifier(schema, "schema", module)
    validate_identifier(table, "table", module)
    cur.execute("SELECT current_database()")
    dbname = cur.fetchone()[0]
    cur.execute("SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,))
    row = cur.fetchone()
    if row is None:
        cur.execute(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname !~ '^pg_' "
            "AND nspname <> 'information_schema' ORDER BY 1"
        )
        names = [r[0] for r in cur.fetchall()]
        return _fail(module, f'schema "{schema}" does not exist in database "{dbname}"; '
                             f"schemas that exist: {_truncated_list(names)}")
    nsp_oid = row[0]
    cur.execute(
        "SELECT c.oid, c.relkind, c.relispartition FROM pg_catalog.pg_class c "
        "WHERE c.relnamespace = %s AND c.relname = %s",
        (nsp_oid, table),
    )
    row = cur.fetchone()
    if row is None:
        cur.execute(
            "SELECT relname FROM pg_catalog.pg_class WHERE relnamespace = %s AND relkind IN ('r', 'p') "
            "ORDER BY 1",
            (nsp_oid,),
        )
        names = [r[0] for r in cur.fetchall()]
        return _fail(module, f'table "{schema}"."{table}" does not exist in database "{dbname}"; '
                             f'tables in schema "{schema}": {_truncated_list(names)}')
    oid, relkind, relispartition = row
    if relkind not in ("r", "p"):
        return _fail(module, f'"{schema}"."{table}" is a {RELKIND_NAMES.get(relkind, relkind)}, not a table')
    version = server_version_num(cur)
    generated = sql.SQL("a.attgenerated") if version >= 120000 else sql.SQL("''::\"char\"")
    cur.execute(
        sql.SQL(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, {gen}, "
            "a.attidentity FROM pg_catalog.pg_attribute a "
            "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ).format(gen=generated),
        (oid,),
    )
    columns = [
        {"name": r[0], "type": r[1], "not_null": bool(r[2]), "generated": r[3] or "", "identity": r[4] or ""}
        for r in cur.fetchall()
    ]
    cur.execute(
        "SELECT con.conname, a.attname FROM pg_catalog.pg_constraint con "
        "CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum "
        "WHERE con.conrelid = %s AND con.contype = 'p' ORDER BY k.ord",
        (oid,),
    )
    pk_rows = cur.fetchall()
    cur.execute(
        "SELECT con.conname, con.conrelid::regclass::text, pg_catalog.pg_get_constraintdef(con.oid) "
        "FROM pg_catalog.pg_constraint con WHERE con.contype = 'f' AND con.confrelid = %s ORDER BY 1",
        (oid,),
    )
    referencing = [{"name": r[0], "table": r[1], "definition": r[2]} for r in cur.fetchall()]
    cur.execute(
        "SELECT t.tgname, t.tgenabled, pg_catalog.pg_get_triggerdef(t.oid) FROM pg_catalog.pg_trigger t "
        "WHERE t.tgrelid = %s AND NOT t.tgisinternal ORDER BY 1",
        (oid,),
    )
    triggers = [{"name": r[0], "enabled": r[1], "definition": r[2]} for r in cur.fetchall()]
    cur.execute("SELECT inhparent::regclass::text FROM pg_catalog.pg_inherits WHERE inhrelid = %s ORDER BY 1", (oid,))
    parents = [r[0] for r in cur.fetchall()]
    cur.execute("SELECT inhrelid::regclass::text FROM pg_catalog.pg_inherits WHERE inhparent = %s ORDER BY 1", (oid,))
    children = [r[0] for r in cur.fetchall()]
    partition_key, partition_expr, leaves = [], False, []
    if relkind == "p":
        # Every partitioned level's key (a sub-partitioned partition adds its own), by column name; 0 = expression.
        cur.execute(
            "SELECT DISTINCT a.attname FROM pg_catalog.pg_partition_tree(%s) t "
            "JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid = t.relid "
            "CROSS JOIN LATERAL unnest(pt.partattrs::int2[]) k(attnum) "
            "LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = k.attnum "
            "ORDER BY 1",
            (oid,),
        )
        names = [r[0] for r in cur.fetchall()]
        partition_expr = any(n is None for n in names)
        partition_key = [n for n in names if n is not None]
        cur.execute("SELECT relid::regclass::text FROM pg_catalog.pg_partition_tree(%s) WHERE isleaf ORDER BY 1",
                    (oid,))
        leaves = [r[0] for r in cur.fetchall()]
    info = {
        "schema": schema,
        "table": table,
        "oid": oid,
        "relkind": relkind,
        "partitioned": relkind == "p",
        "is_partition": bool(relispartition),
        "inherits_from": parents,
        "inherited_by": children,
        "columns": columns,
        "column_names": [c["name"] for c in columns],
        "primary_key": [r[1] for r in pk_rows],
        "primary_key_name": pk_rows[0][0] if pk_rows else None,
        "referenced_by": referencing,
        "triggers": triggers,
        "partition_key": partition_key,
        "partition_key_expression": bool(partition_expr),
        "partitions": leaves,
    }
    if refuse_partitioned and (info["partitioned"] or info["is_partition"]):
        what = "a partitioned table" if info["partitioned"] else "a partition of {}".format(", ".join(parents))
        return _fail(module, f'"{schema}"."{table}" is {what}: not supported here; '
                             "handle each partition/the parent explicitly")
    if refuse_inheritance and not info["is_partition"] and not info["partitioned"] and (parents or children):
        return _fail(module, f'"{schema}"."{table}" takes part in table inheritance (parents: '
                             f"{_truncated_list(parents)}; children: {_truncated_list(children)}): rows of "
                             "other tables would be mixed in; not supported here")
    return info


def check_columns(table_info, columns, module=None, what="column"):
    """Every name in ``columns`` must be a column of the table; fail naming it and the real columns."""
    if not columns:
        return _fail(module, "no {} given for table {}.{}".format(what, table_info["schema"], table_info["table"]))
    seen = set()
    for col in columns:
        validate_identifier(col, what, module)
        if col in seen:
            return _fail(module, f'{what} "{col}" is listed twice')
        seen.add(col)
        if col not in table_info["column_names"]:
            real = ", ".join(table_info["column_names"])
            return _fail(module, f'{what} "{col}" does not exist in table "{table_info["schema"]}".'
                                 f'"{table_info["table"]}"; its columns are: {real}')
    return list(columns)


# --------------------------------------------------------------------------- unique constraints / indexes


def find_equivalent_unique(cur, table_oid, columns):
    """UNIQUE constraints and unique indexes of the table whose key column set equals ``columns``.

    Order does not matter (as ON CONFLICT inference sees it). Every candidate is returned, valid or
    not, partial or not, with expressions or not; ``usable`` says whether ON CONFLICT (columns) can
    infer it (valid, ready, immediate, no predicate, no expression).
    """
    version = server_version_num(cur)
    nnd = sql.SQL("i.indnullsnotdistinct") if version >= 150000 else sql.SQL("false")
    nkey = sql.SQL("i.indnkeyatts") if version >= 110000 else sql.SQL("i.indnatts")
    query = sql.SQL(
        "SELECT ic.relname, i.indisvalid, i.indisready, i.indimmediate, i.indisprimary, "
        "i.indpred IS NOT NULL, i.indexprs IS NOT NULL, {nnd}, "
        "con.conname, con.contype, pg_catalog.pg_get_indexdef(i.indexrelid), "
        "CASE WHEN con.oid IS NULL THEN NULL ELSE pg_catalog.pg_get_constraintdef(con.oid) END, "
        "ARRAY(SELECT CASE WHEN k.attnum = 0 THEN NULL ELSE a.attname::text END "
        "      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) "
        "      LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "      WHERE k.ord <= {nkey} ORDER BY k.ord), "
        "ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, k.ord::int, true) "
        "      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) "
        "      WHERE k.ord <= {nkey} ORDER BY k.ord) "
        "FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid "
        "LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid "
        "  AND con.contype IN ('u', 'p') "
        "WHERE i.indrelid = %s AND i.indisunique ORDER BY ic.relname"
    ).format(nnd=nnd, nkey=nkey)
    cur.execute(query, (table_oid,))
    wanted = set(columns)
    found = []
    for (idxname, valid, ready, immediate, primary, partial, has_expr, nulls_nd, conname, _contype,
         idxdef, condef, keycols, keydefs) in cur.fetchall():
        if len(keycols) != len(columns):
            continue
        plain = [c for c in keycols if c is not None]
        if len(set(plain)) != len(plain) or not set(plain) <= wanted:
            continue
        if len(plain) != len(columns):
            # expression entries: each must mention one of the remaining wanted columns
            rest = wanted - set(plain)
            exprs = [d for c, d in zip(keycols, keydefs) if c is None]
            if not all(any(re.search(rf"(^|[^\w]){re.escape(r)}([^\w]|$)", e) for r in rest) for e in exprs):
                continue
        kind = "constraint" if conname else "index"
        found.append({
            "name": conname or idxname,
            "index_name": idxname,
            "constraint_name": conname,
            "type": kind,
            "primary_key": bool(primary),
            "definition": condef if conname else idxdef,
            "index_definition": idxdef,
            "columns": [c if c is not None else d for c, d in zip(keycols, keydefs)],
            "valid": bool(valid and ready),
            "partial": bool(partial),
            "expression": bool(has_expr),
            "immediate": bool(immediate),
            "nulls_not_distinct": bool(nulls_nd),
            "usable": bool(valid and ready and immediate and not partial and not has_expr),
        })
    return found


# --------------------------------------------------------------------------- neighbours: who else sees the table


def _optional(cur, query, params=None):
    """Run a catalog query that may need privileges the role lacks: (rows, None) or (None, reason).

    A savepoint keeps the caller's transaction usable after 'permission denied'."""
    cur.execute("SAVEPOINT dedup_optional")
    try:
        cur.execute(query, params)
        rows = cur.fetchall()
    except psycopg2.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT dedup_optional")
        return None, (getattr(exc, "pgerror", None) or str(exc)).strip()
    cur.execute("RELEASE SAVEPOINT dedup_optional")
    return rows, None


def table_publications(cur, schema, table):
    """Publications that publish the table (listed, by schema, or FOR ALL TABLES) and what each publishes."""
    version = server_version_num(cur)
    if version < 100000:
        return []
    truncate = sql.SQL("p.pubtruncate") if version >= 110000 else sql.SQL("false")
    cur.execute(
        sql.SQL(
            "SELECT p.pubname, p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, {trunc} "
            "FROM pg_catalog.pg_publication p WHERE p.puballtables OR EXISTS ("
            "  SELECT 1 FROM pg_catalog.pg_publication_tables pt "
            "  WHERE pt.pubname = p.pubname AND pt.schemaname = %s AND pt.tablename = %s) ORDER BY 1"
        ).format(trunc=truncate),
        (schema, table),
    )
    return [{"name": r[0], "all_tables": bool(r[1]), "insert": bool(r[2]), "update": bool(r[3]),
             "delete": bool(r[4]), "truncate": bool(r[5])} for r in cur.fetchall()]


def logical_slots(cur):
    """Logical replication slots of the current database: (slots, None) or (None, why they cannot be read)."""
    rows, why = _optional(
        cur,
        "SELECT slot_name::text, plugin::text, active, active_pid FROM pg_catalog.pg_replication_slots "
        "WHERE slot_type = 'logical' AND database = current_database() ORDER BY 1",
    )
    if rows is None:
        return None, why
    return [{"name": r[0], "plugin": r[1], "active": bool(r[2]), "active_pid": r[3]} for r in rows], None


def table_subscriptions(cur, table_oid):
    """Subscriptions that write into the table: (list, None) or (None, why they cannot be read)."""
    if server_version_num(cur) < 100000:
        return [], None
    rows, why = _optional(
        cur,
        "SELECT s.subname::text, sr.srsubstate::text FROM pg_catalog.pg_subscription_rel sr "
        "JOIN pg_catalog.pg_subscription s ON s.oid = sr.srsubid WHERE sr.srrelid = %s ORDER BY 1",
        (table_oid,),
    )
    if rows is None:
        return None, why
    return [{"name": r[0], "state": r[1]} for r in rows], None


RULE_EVENTS = {"1": "SELECT", "2": "UPDATE", "3": "INSERT", "4": "DELETE"}


def table_rules(cur, table_oid):
    """Rewrite rules of the table other than a view's _RETURN, with their event, INSTEAD and enabled state."""
    cur.execute(
        "SELECT r.rulename::text, r.ev_type::text, r.is_instead, r.ev_enabled::text, "
        "pg_catalog.pg_get_ruledef(r.oid) FROM pg_catalog.pg_rewrite r "
        "WHERE r.ev_class = %s AND r.rulename <> '_RETURN' ORDER BY 1",
        (table_oid,),
    )
    return [{"name": r[0], "event": RULE_EVENTS.get(r[1], r[1]), "instead": bool(r[2]), "enabled": r[3],
             "definition": r[4]} for r in cur.fetchall()]


def replica_identity(cur, table_oid):
    """REPLICA IDENTITY of the table: mode (default|nothing|full|index) and whether a DELETE can be published."""
    cur.execute(
        "SELECT c.relreplident::text, "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) "
        "FROM pg_catalog.pg_class c WHERE c.oid = %s",
        (table_oid,),
    )
    ident, has_pk, has_index = cur.fetchone()
    mode = {"d": "default", "n": "nothing", "f": "full", "i": "index"}.get(ident, ident)
    usable = mode == "full" or (mode == "default" and has_pk) or (mode == "index" and has_index)
    return {"mode": mode, "has_primary_key": bool(has_pk), "usable": bool(usable)}


def total_size(cur, oid):
    """pg_total_relation_size of a table, or of all its partitions when it is partitioned (the parent has none)."""
    cur.execute(
        "SELECT CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_catalog.pg_total_relation_size(t.relid)), 0) "
        "FROM pg_catalog.pg_partition_tree(c.oid) t) ELSE pg_catalog.pg_total_relation_size(c.oid) END::bigint "
        "FROM pg_catalog.pg_class c WHERE c.oid = %s",
        (oid,),
    )
    return cur.fetchone()[0]


def dump_unreadable(cur, exclude_schema, limit=20):
    """Relations pg_dump would fail on: the tables, sequences and materialized views (of every schema but
    pg_catalog, information_schema, pg_toast/pg_temp and C(exclude_schema)) on which the connecting role lacks
    SELECT. Objects of an extension are left out (pg_dump does not dump them) unless they are one of its
    configuration tables (pg_dump dumps their data). Foreign tables are left out (their data is not dumped).

    Returns {"count": n, "relations": the first C(limit) as schema.name (kind)}. Partitions and inheritance
    children are read by pg_dump on their own, so they count on their own too.
    """
    cur.execute(
        "SELECT format('%%I.%%I (%%s)', n.nspname, c.relname, CASE c.relkind WHEN 'S' THEN 'sequence' "
        "WHEN 'm' THEN 'materialized view' WHEN 'p' THEN 'partitioned table' ELSE 'table' END) "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'S', 'm') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s) AND n.nspname !~ '^pg_toast' "
        "AND n.nspname !~ '^pg_temp_' "
        "AND NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass "
        "AND d.objid = c.oid AND d.deptype = 'e') "
        "AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension e WHERE c.oid = ANY (e.extconfig))) "
        "AND NOT pg_catalog.has_table_privilege(c.oid, 'SELECT') ORDER BY n.nspname, c.relname",
        (exclude_schema,),
    )
    names = [r[0] for r in cur.fetchall()]
    return {"count": len(names), "relations": names[:limit]}
