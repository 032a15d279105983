"""A pg_dump becomes the backup only when it is complete (used by the pg_dump_backup module).

pg_dump writes to ``<final>.partial-<stamp>-<pid>`` next to the final path. The archive is then read whole
(``pg_restore --file=/dev/null``: every data block, not only the table of contents), its table of contents
must hold the data of every managed table, and only then is it made owner-only, fsync'ed and renamed to the
final path. A file found at the final path is never accepted by its name: it is set aside as
``<final>.unverified-<stamp>``. Partials of killed runs are removed. The password reaches pg_dump only in the
child's environment (PGPASSWORD): never argv, never a file. The write counters of the managed tables
(``pg_stat_user_tables``) are read before the dump, so a resumed deploy can tell whether its dump still holds
every row of the tables it has not migrated yet.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import hashlib
import os
import shutil
import signal
import subprocess

from ansible.module_utils.dedup_pg import APP_PREFIX, DedupPgError, scrub

PARTIAL = ".partial-"
UNVERIFIED = ".unverified-"
APP_NAME = APP_PREFIX + "pg_dump"
_PR_SET_PDEATHSIG = 1


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- the child processes


def _die_with_parent():  # pragma: no cover - runs in the forked child
    """Linux: the child gets SIGKILL when the module dies (a killed play must not leave pg_dump writing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def child_env(params: dict) -> dict:
    """Environment of pg_dump/pg_restore: the password only here (PGPASSWORD); sslmode, timeout and the TLS files
    (CA, client certificate and key) as the modules use them; an application_name that says who is reading."""
    env = dict(os.environ)
    env["PGAPPNAME"] = APP_NAME
    if params.get("login_password"):
        env["PGPASSWORD"] = params["login_password"]
    if params.get("ssl_mode"):
        env["PGSSLMODE"] = params["ssl_mode"]
    if params.get("connect_timeout") is not None and int(params["connect_timeout"]) > 0:
        env["PGCONNECT_TIMEOUT"] = str(int(params["connect_timeout"]))
    for opt, var in (("ssl_rootcert", "PGSSLROOTCERT"), ("ssl_cert", "PGSSLCERT"), ("ssl_key", "PGSSLKEY")):
        if params.get(opt):
            env[var] = params[opt]
    return env


def connection_args(params: dict) -> list[str]:
    """pg_dump's connection options (no secret among them); unset ones fall back to PG* variables."""
    args = ["--no-password"]
    if params.get("login_host"):
        args.append("--host=" + params["login_host"])
    if params.get("login_port"):
        args.append("--port=" + str(int(params["login_port"])))
    if params.get("login_user"):
        args.append("--username=" + params["login_user"])
    if params.get("login_db"):
        args.append("--dbname=" + params["login_db"])
    return args


def run(argv: list[str], env: dict | None = None, gone=None, every: float = 1.0) -> subprocess.CompletedProcess:
    """Run a child that dies with this process; a missing executable is a DedupPgError naming it.

    ``gone()`` is asked every ``every`` seconds while the child runs: once it says the play that started the
    module is gone (killed play, dropped connection), the child is killed and a DedupPgError raised."""
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_die_with_parent)
    except FileNotFoundError as exc:
        raise DedupPgError("%s: executable not found (install the PostgreSQL client tools or set its path)"
                           % argv[0]) from exc
    except PermissionError as exc:
        raise DedupPgError("%s: permission denied running it: %s" % (argv[0], exc)) from exc
    while True:
        try:
            out, err = proc.communicate(timeout=every if gone is not None else None)
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            if gone():
                proc.kill()
                proc.communicate()
                name = os.path.basename(argv[0])
                raise DedupPgError("the play that started %s is gone (killed or disconnected): stopped it; the "
                                   "partial output is removed and nothing is recorded" % name) from None
        except BaseException:
            proc.kill()
            raise


def describe_failure(what: str, stderr: str, secret: str | None = None) -> str:
    """pg_dump/pg_restore's own words first, then the likely cause, judged from those words only."""
    text = scrub((stderr or "").strip(), secret) or "(no message)"
    low = text.lower()
    if "permission denied" in low:
        hint = ("permission denied: the database role lacks a privilege on something it dumps (pg_dump needs "
                "SELECT on every table and sequence), or the OS user cannot write the backup directory")
    elif "no space left on device" in low or "disk quota exceeded" in low:
        hint = "the backup directory's filesystem is full: free space or point dedup_backup_dir elsewhere"
    elif "version mismatch" in low or "unsupported version" in low or "too old" in low:
        hint = "the client tools' version does not match the server's: use pg_dump of the server's major or newer"
    elif "could not connect" in low or "connection to server" in low:
        hint = "pg_dump could not connect with the same options the modules use"
    else:
        hint = "see the message"
    return "%s failed (%s): %s" % (what, hint, text[-2000:])


# --------------------------------------------------------------------------- files


def partials(final: str) -> list[str]:
    return sorted(glob.glob(glob.escape(final) + PARTIAL + "*"))


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def set_aside(final: str, stamp: str) -> str:
    """Rename whatever is at ``final`` to ``<final>.unverified-<stamp>`` (never accepted by its name)."""
    aside = final + UNVERIFIED + stamp
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = "%s%s%s-%d" % (final, UNVERIFIED, stamp, n)
    os.rename(final, aside)
    return aside


def _files(path: str) -> list[str]:
    """Relative paths of every file under the directory ``path``, sorted bytewise (as ``sort -z`` in C)."""
    out = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            out.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(out, key=lambda p: p.encode("utf-8", "surrogateescape"))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def measure(path: str) -> tuple[int, str]:
    """(bytes, sha256) of a dump. A directory: bytes like ``du -sb``, sha256 of the ``sha256sum`` lines of its
    files in sorted order (``find . -type f | sort | xargs sha256sum | sha256sum``), as the ledger has always
    recorded it, so older rows stay comparable."""
    if not os.path.isdir(path):
        return os.path.getsize(path), _sha256_file(path)
    total = os.lstat(path).st_size
    lines = []
    for rel in _files(path):
        full = os.path.join(path, rel)
        total += os.lstat(full).st_size
        lines.append("%s  ./%s\n" % (_sha256_file(full), rel))
    for root, dirs, _names in os.walk(path):
        total += sum(os.lstat(os.path.join(root, d)).st_size for d in dirs)
    return total, hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(path: str) -> None:
    """Owner-only (file 0600; directory 0700 with 0600 files) and on disk (fsync of every file and directory)."""
    if os.path.isdir(path):
        for rel in _files(path):
            full = os.path.join(path, rel)
            os.chmod(full, 0o600)
            _fsync(full)
        for root, dirs, _names in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        os.chmod(path, 0o700)
        _fsync(path, directory=True)
    else:
        os.chmod(path, 0o600)
        _fsync(path)


def publish(tmp: str, final: str) -> None:
    """Atomic rename into place, then the directory entry itself is made durable."""
    os.rename(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)) or ".", directory=True)


# --------------------------------------------------------------------------- verification


def data_relations(cur, schema: str, tables: list[str]) -> dict:
    """Where each table's rows are stored: [(schema, name)] of the table itself, or of every leaf partition of a
    partitioned table (a dump holds a partitioned table's data under its partitions' names)."""
    out = {}
    for t in tables:
        cur.execute("SELECT n.nspname, c.relname FROM pg_catalog.pg_partition_tree("
                    "to_regclass(format('%%I.%%I', %s::text, %s::text))) pt "
                    "JOIN pg_catalog.pg_class c ON c.oid = pt.relid "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE pt.isleaf ORDER BY 1, 2",
                    (schema, t))
        out[t] = [tuple(r) for r in cur.fetchall()] or [(schema, t)]
    return out


def verify(pg_restore: str, path: str, schema: str, tables: list[str], gone=None, relations=None) -> int:
    """Read the whole archive and check its table of contents; return the number of TOC entries.
    ``relations`` (from data_relations) names where each table's data is; by default the table itself."""
    listing = run([pg_restore, "--list", path], gone=gone)
    if listing.returncode != 0:
        raise DedupPgError(describe_failure("pg_restore --list %s" % path, listing.stderr))
    entries = [line for line in listing.stdout.splitlines() if line.strip() and not line.startswith(";")]
    relations = relations or {t: [(schema, t)] for t in tables}
    missing = ["%s.%s" % rel for t in tables for rel in relations[t]
               if not any(("TABLE DATA %s %s " % rel) in line for line in entries)]
    if missing:
        raise DedupPgError("the dump has no data for %s (TABLE DATA missing from its table of contents): it "
                           "cannot be trusted" % ", ".join(missing))
    whole = run([pg_restore, "--file=/dev/null", path], gone=gone)
    if whole.returncode != 0:
        raise DedupPgError(describe_failure("reading the whole dump back (pg_restore --file=/dev/null %s)" % path,
                                            whole.stderr))
    return len(entries)


# --------------------------------------------------------------------------- write counters


def table_writes(cur, schema: str, tables: list[str]) -> tuple[dict, str | None]:
    """Per table n_tup_ins + n_tup_upd + n_tup_del (summed over the partitions of a partitioned table; None when
    there is no statistics row), and the database's stats_reset (a reset makes every counter meaningless)."""
    relations = data_relations(cur, schema, tables)
    writes = {}
    for t in tables:
        total = None
        for rel_schema, rel in relations[t]:
            cur.execute("SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_catalog.pg_stat_user_tables "
                        "WHERE schemaname = %s AND relname = %s", (rel_schema, rel))
            row = cur.fetchone()
            if row is not None:
                total = (total or 0) + int(row[0])
        writes[t] = total
    cur.execute("SELECT stats_reset::text FROM pg_catalog.pg_stat_database WHERE datname = current_database()")
    row = cur.fetchone()
    return writes, (row[0] if row else None)


def stale_tables(recorded: dict | None, recorded_reset, current: dict, current_reset) -> list[dict]:
    """Tables whose writes since the dump cannot be ruled out: counter changed, unknown, or stats reset."""
    out = []
    recorded_reset = None if recorded_reset in (None, "", "None") else str(recorded_reset)
    current_reset = None if current_reset in (None, "", "None") else str(current_reset)
    for table, now in current.items():
        before = (recorded or {}).get(table)
        if not isinstance(recorded, dict) or table not in recorded:
            why = "no write counter was recorded with the dump"
        elif recorded_reset != current_reset:
            why = "the statistics were reset since the dump (%s, then %s)" % (recorded_reset, current_reset)
        elif before is None or now is None:
            why = "no statistics for the table (then %s, now %s)" % (before, now)
        elif int(before) != int(now):
            why = "%d rows inserted, updated or deleted since the dump" % (int(now) - int(before)) \
                if int(now) > int(before) else "its counter went back (%s -> %s): statistics reset" % (before, now)
        else:
            continue
        out.append({"table": table, "recorded": before, "now": now, "reason": why})
    return out
