"""Documentation fragment: the connection options every dedup-rollout database module takes.

Modules say ``extends_documentation_fragment: [dedup_pg]``; the options themselves come from
``module_utils/dedup_pg.py``'s ``pg_common_argument_spec()``.
"""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  login_host:
    description:
      - Host name or IP, or a unix socket directory (a value starting with C(/)).
      - Empty means the libpq default (C(PGHOST), then the default socket).
    type: str
    default: ""
    aliases: [host, db_host]
  login_port:
    description: Port; unset means C(PGPORT) or 5432.
    type: int
    aliases: [port, db_port]
  login_db:
    description: Database; unset means C(PGDATABASE) or the user name.
    type: str
    aliases: [db, database, db_name]
  login_user:
    description: Role to connect as; unset means C(PGUSER) or the OS user.
    type: str
    aliases: [user, db_user]
  login_password:
    description: Password; unset means C(PGPASSWORD) or C(~/.pgpass). Never shown in output.
    type: str
    aliases: [password, db_password]
  ssl_mode:
    description: libpq sslmode.
    type: str
    default: prefer
    choices: [disable, allow, prefer, require, verify-ca, verify-full]
    aliases: [sslmode]
  connect_timeout:
    description: Seconds to wait for the connection (0 = wait forever).
    type: int
    default: 10
  ssl_rootcert:
    description:
      - CA certificate file (PEM) that signed the server's certificate (libpq C(sslrootcert)); what
        C(ssl_mode=verify-ca) and C(verify-full) check against. Unset means C(PGSSLROOTCERT) or
        C(~/.postgresql/root.crt).
    type: path
    aliases: [sslrootcert, ca_cert]
  ssl_cert:
    description:
      - Client certificate file (libpq C(sslcert)).
      - Unset means C(PGSSLCERT) or C(~/.postgresql/postgresql.crt).
    type: path
    aliases: [sslcert]
  ssl_key:
    description:
      - Private key of O(ssl_cert) (libpq C(sslkey)).
      - Unset means C(PGSSLKEY) or C(~/.postgresql/postgresql.key).
    type: path
    aliases: [sslkey]
notes:
  - Options left unset fall back to libpq's environment variables (C(PGHOST), C(PGPORT), C(PGDATABASE),
    C(PGUSER), C(PGPASSWORD), C(PGSSLMODE), C(PGSSLROOTCERT)) and C(~/.pgpass), exactly as psql does.
  - The password is never returned, logged or shown in an error message.
  - pg_dump (module C(pg_dump_backup)) gets the same C(ssl_mode), C(connect_timeout) and TLS files, as
    C(PGSSLMODE), C(PGCONNECT_TIMEOUT), C(PGSSLROOTCERT), C(PGSSLCERT) and C(PGSSLKEY).
requirements:
  - psycopg2 on the host the module runs on
"""

    # extends_documentation_fragment: [dedup_pg, dedup_pg.run_lock] -- the modules that wait for locks or work
    # in batches and stop once the play that started them is gone (module_utils/dedup_locks.py PlayWatch).
    RUN_LOCK = r"""
options:
  run_lock_id:
    description:
      - The C(run_id) under which the play holds its C(pg_run_lock) lock (empty = no lock). Between two lock
        attempts (or two batches) the module stops once that lock's holder session is gone (the play was killed),
        also under C(async) where its parent process is not the play. Without it only a change of the parent
        process tells.
    type: str
    default: ''
"""
