#!/usr/bin/env python3
"""dedup-rollout scheduled check: duplicates and UNIQUE constraints after a deploy, for cron and Prometheus.

Installed on the db host by roles/monitor/tasks/schedule.yml with a JSON config (0600) and a pgpass
file (0600); the password is never on the command line or in the crontab. Every run:

  * counts, per table, the rows beyond one per natural key (NULLs grouped as NOT DISTINCT) and looks
    for a valid UNIQUE constraint or index on exactly the natural key;
  * writes a Prometheus node-exporter textfile atomically (dedup_duplicate_rows, dedup_constraint_present,
    dedup_check_success, dedup_check_last_run_timestamp_seconds, ...);
  * appends one log line, and records the check in <backup schema>.monitor_checks (the ledger);
  * keeps its own cron file in step with its period: hourly during the first hours after the deploy,
    daily until the end of the period, then it removes its cron file, its config, its pgpass file and
    its textfile; it does so at once when the ledger says the deploy was rolled back.

Commands (the clock is injectable with --now or DEDUP_NOW, ISO 8601):
  dedup_check.py --config FILE [--now TS] run           check now (what cron runs)
  dedup_check.py --config FILE [--now TS] schedule      write (or remove) the cron file for the period
  dedup_check.py --config FILE [--now TS] schedule --dry-run
Exit codes: 0 clean (or period over), 1 a duplicate or a missing constraint, 2 the check could not run.
Only the standard library and psycopg2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import socket
import sys
import tempfile
import traceback

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported as a failed check
    psycopg2 = None
    sql = None

UTC = dt.timezone.utc
MARKER = "dedup-check"


# --------------------------------------------------------------------------- time


def parse_ts(text: str) -> dt.datetime:
    """ISO 8601 (``Z`` or an offset; a naive value is UTC) to an aware datetime."""
    text = text.strip().replace(" ", "T", 1)
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso(value: dt.datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_from(arg: str | None) -> dt.datetime:
    text = arg or os.environ.get("DEDUP_NOW") or ""
    return parse_ts(text) if text else dt.datetime.now(UTC)


def period(cfg: dict) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    start = parse_ts(cfg["period_start"])
    hourly_until = start + dt.timedelta(hours=float(cfg.get("hourly_hours", 48)))
    until = start + dt.timedelta(days=float(cfg.get("days", 7)))
    return start, min(hourly_until, until), until


def phase_at(cfg: dict, now: dt.datetime) -> str:
    """hourly, daily or over."""
    _, hourly_until, until = period(cfg)
    if now >= until:
        return "over"
    return "hourly" if now < hourly_until else "daily"


# --------------------------------------------------------------------------- files


def write_atomic(path: str, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` through a temp file in the same directory; False when it was already so."""
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text and (os.stat(path).st_mode & 0o777) == mode:
                return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    # A leading dot and no .prom suffix: cron and node-exporter both ignore the file while it is written.
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def remove(path: str | None) -> bool:
    if not path:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- cron


def cron_command(cfg: dict) -> str:
    argv = cfg.get("command") or [sys.executable, os.path.abspath(__file__), "--config", cfg["config_path"]]
    cmd = " ".join(shlex.quote(str(a)) for a in argv) + " run >/dev/null"
    if cfg.get("log_file"):
        cmd += " 2>>" + shlex.quote(cfg["log_file"])
    if "%" in cmd:
        raise ValueError("a path of the scheduled check contains '%', which cron would treat as a newline")
    return cmd


def cron_text(cfg: dict, phase: str) -> str:
    """The whole cron file for a phase (hourly or daily)."""
    start, hourly_until, until = period(cfg)
    minute = int(cfg.get("minute", 17)) % 60
    hour = int(cfg.get("daily_hour", 6)) % 24
    when = f"{minute} * * * *" if phase == "hourly" else f"{minute} {hour} * * *"
    return (
        f"# {MARKER}:{cfg['name']} - dedup-rollout scheduled check, managed by dedup_check.py; do not edit.\n"
        f"# Deploy {cfg.get('deploy_run_id', '?')} of {cfg.get('environment', '?')}/{cfg['db'].get('dbname', '?')}: "
        f"hourly until {iso(hourly_until)}, daily until {iso(until)}, then it removes itself.\n"
        "SHELL=/bin/sh\n"
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"{when} {cfg.get('cron_user', 'root')} {cron_command(cfg)}\n"
    )


def sync_cron(cfg: dict, now: dt.datetime, dry_run: bool = False) -> dict:
    """Make the cron file match the phase at ``now``: hourly/daily line, or no file once the period is over."""
    phase = phase_at(cfg, now)
    path = cfg["cron_file"]
    if phase == "over":
        changed = os.path.exists(path)
        if changed and not dry_run:
            remove(path)
        return {"changed": changed, "phase": phase, "cron_file": path, "installed": False}
    want = cron_text(cfg, phase)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SystemExit(f"dedup_check: the cron directory {directory} does not exist (monitor_cron_dir); "
                         "create it or point monitor_cron_dir at cron's drop-in directory (/etc/cron.d)")
    try:
        with open(path, encoding="utf-8") as fh:
            changed = fh.read() != want or (os.stat(path).st_mode & 0o777) != 0o644
    except FileNotFoundError:
        changed = True
    if changed and not dry_run:
        write_atomic(path, want, 0o644)
    return {"changed": changed, "phase": phase, "cron_file": path, "installed": True}


def retire(cfg: dict, now: dt.datetime) -> list[str]:
    """End of the period: remove the cron file, the textfile, the pgpass file and the config."""
    removed = []
    for path in (cfg.get("cron_file"), cfg.get("textfile"), cfg["db"].get("passfile"), cfg.get("config_path")):
        if remove(path):
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- database


def connect(cfg: dict):
    db = cfg["db"]
    kw = {
        "host": db.get("host") or None,
        "port": db.get("port") or None,
        "dbname": db.get("dbname"),
        "user": db.get("user"),
        "sslmode": db.get("sslmode") or "prefer",
        "connect_timeout": int(db.get("connect_timeout") or 10),
        "application_name": "dedup-rollout/dedup_check",
    }
    if db.get("passfile"):
        kw["passfile"] = db["passfile"]
    for key in ("sslrootcert", "sslcert", "sslkey"):  # TLS files as the deploy used them ("" = libpq default)
        if db.get(key):
            kw[key] = db[key]
    conn = psycopg2.connect(**{k: v for k, v in kw.items() if v is not None})
    return conn


def duplicate_rows(cur, schema: str, table: str, key: list[str]) -> int:
    """Rows beyond one per natural key; GROUP BY puts NULLs together, like UNIQUE NULLS NOT DISTINCT."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in key)
    cur.execute(
        sql.SQL("SELECT coalesce(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM ONLY {} GROUP BY {} "
                "HAVING count(*) > 1) g").format(sql.Identifier(schema, table), cols)
    )
    return int(cur.fetchone()[0])


def unique_on(cur, schema: str, table: str, key: list[str]) -> dict | None:
    """A valid, total, plain-column UNIQUE constraint or index on exactly the key columns (any order)."""
    cur.execute(
        """
        SELECT coalesce(con.conname, ic.relname), con.conname IS NOT NULL, i.indisvalid AND i.indisready
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('u', 'p')
        WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
          AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
               FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]))
              = (SELECT array_agg(k ORDER BY k) FROM unnest(%s::text[]) k)
          AND i.indnatts = cardinality(%s::text[]) AND i.indnkeyatts = i.indnatts
        ORDER BY (i.indisvalid AND i.indisready) DESC, con.conname IS NOT NULL DESC
        LIMIT 1
        """,
        (schema, table, list(key), list(key)),
    )
    row = cur.fetchone()
    if not row:
        return None
    return {"name": row[0], "is_constraint": bool(row[1]), "valid": bool(row[2])}


def deploy_status(cfg: dict) -> str | None:
    """The ledger's status of the watched deploy (None when it cannot be read: the check then runs as usual)."""
    if not cfg.get("deploy_run_id"):
        return None
    try:
        conn = connect(cfg)
    except Exception:  # noqa: BLE001 - the check itself reports the connection failure
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(format('%%I.%%I', %s::text, 'runs')) IS NOT NULL",
                        (cfg.get("backup_schema") or "dedup_rollout",))
            if not cur.fetchone()[0]:
                return None
            cur.execute(sql.SQL("SELECT status FROM {} WHERE run_id = %s").format(
                sql.Identifier(cfg.get("backup_schema") or "dedup_rollout", "runs")), (cfg["deploy_run_id"],))
            row = cur.fetchone()
        return row[0] if row else None
    except Exception:  # noqa: BLE001
        return None
    finally:
        conn.rollback()
        conn.close()


def check_tables(cfg: dict) -> tuple[list[dict], int]:
    """Measure every table in one READ ONLY transaction; returns (results, database size)."""
    conn = connect(cfg)
    try:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('statement_timeout', %s, true)", (cfg.get("statement_timeout", "30min"),))
            cur.execute("SELECT set_config('work_mem', %s, true)", (cfg.get("work_mem", "256MB"),))
            cur.execute("SELECT pg_database_size(current_database())")
            db_size = int(cur.fetchone()[0])
            out = []
            for t in cfg["tables"]:
                schema = t.get("schema") or cfg["schema"]
                entry = {"table": t["name"], "schema": schema, "natural_key": list(t["natural_key"]),
                         "constraint": t.get("constraint") or ""}
                cur.execute("SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                            (schema, t["name"]))
                if not cur.fetchone()[0]:
                    entry.update(exists=False, duplicate_rows=None, constraint_present=False, bytes=None)
                    out.append(entry)
                    continue
                uq = unique_on(cur, schema, t["name"], t["natural_key"])
                cur.execute("SELECT pg_total_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))",
                            (schema, t["name"]))
                size = int(cur.fetchone()[0])
                entry.update(
                    exists=True,
                    duplicate_rows=duplicate_rows(cur, schema, t["name"], t["natural_key"]),
                    constraint_present=bool(uq and uq["valid"]),
                    bytes=size,
                )
                if uq:
                    entry["constraint"] = uq["name"]
                out.append(entry)
        conn.rollback()
        return out, db_size
    finally:
        conn.close()


def record(cfg: dict, now: dt.datetime, clean: bool, problems: list[str], details: dict) -> str | None:
    """Insert the check into <backup schema>.monitor_checks; returns an error text instead of raising."""
    schema = cfg.get("backup_schema") or "dedup_rollout"
    try:
        conn = connect(cfg)
    except Exception as exc:  # noqa: BLE001 - reported in the log line
        return "ledger: " + str(exc).strip().splitlines()[0]
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} (deploy_run_id, checked_at, source, clean, environment, host, "
                        "duplicate_rows, problems, details) VALUES (%s, %s, 'scheduled', %s, %s, %s, %s, %s, %s)")
                .format(sql.Identifier(schema, "monitor_checks")),
                (cfg.get("deploy_run_id"), now, clean, cfg.get("environment"), cfg.get("host") or socket.gethostname(),
                 sum(int(t.get("duplicate_rows") or 0) for t in details.get("tables", [])), problems,
                 json.dumps(details)),
            )
        conn.commit()
        return None
    except Exception as exc:  # noqa: BLE001
        conn.rollback()
        return "ledger: " + str(getattr(exc, "pgerror", None) or exc).strip().splitlines()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------- output


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**kw) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kw.items()) + "}"


def textfile(cfg: dict, now: dt.datetime, tables: list[dict] | None, success: bool, phase: str,
             db_size: int | None) -> str:
    _, _, until = period(cfg)
    base = {"environment": cfg.get("environment", ""), "database": cfg["db"].get("dbname", "")}
    lines = []

    def metric(name, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for lab, value in samples:
            lines.append(f"{name}{labels(**lab)} {value}")

    if tables:
        metric("dedup_duplicate_rows", "Rows beyond one per natural key (0 after a good deploy).",
               [({**base, "schema": t["schema"], "table": t["table"]}, t["duplicate_rows"])
                for t in tables if t["duplicate_rows"] is not None])
        metric("dedup_constraint_present",
               "1 when a valid UNIQUE constraint or index covers the natural key of the table.",
               [({**base, "schema": t["schema"], "table": t["table"], "constraint": t["constraint"]},
                 1 if t["constraint_present"] else 0) for t in tables])
        metric("dedup_table_size_bytes", "Total size of the table with its indexes and TOAST.",
               [({**base, "schema": t["schema"], "table": t["table"]}, t["bytes"])
                for t in tables if t["bytes"] is not None])
    if db_size is not None:
        metric("dedup_database_size_bytes", "Size of the database.", [(base, db_size)])
    metric("dedup_check_success", "1 when the last scheduled check could run.", [(base, 1 if success else 0)])
    metric("dedup_check_hourly", "1 while the check runs hourly (first hours after the deploy).",
           [(base, 1 if phase == "hourly" else 0)])
    metric("dedup_check_last_run_timestamp_seconds", "When the last scheduled check ran (Unix time).",
           [(base, int(now.timestamp()))])
    metric("dedup_check_period_end_timestamp_seconds", "When the scheduled check removes itself (Unix time).",
           [(base, int(until.timestamp()))])
    return "\n".join(lines) + "\n"


def log(cfg: dict, line: str) -> None:
    print(line, flush=True)
    path = cfg.get("log_file")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# --------------------------------------------------------------------------- commands


def cmd_run(cfg: dict, now: dt.datetime) -> int:
    phase = phase_at(cfg, now)
    head = f"{iso(now)} {MARKER} {cfg['name']} deploy={cfg.get('deploy_run_id', '?')}"
    if phase == "over":
        removed = retire(cfg, now)
        log(cfg, f"{head} status=ended period over, removed: {', '.join(removed) or 'nothing'}")
        return 0
    if psycopg2 is not None and deploy_status(cfg) == "rolled_back":
        # The deploy was rolled back (rollback.yml removes the check too): its duplicates are expected again.
        removed = retire(cfg, now)
        log(cfg, f"{head} status=ended deploy rolled back, removed: {', '.join(removed) or 'nothing'}")
        return 0
    try:
        if psycopg2 is None:
            raise RuntimeError("python psycopg2 is not installed for " + sys.executable)
        tables, db_size = check_tables(cfg)
    except Exception as exc:  # noqa: BLE001 - any failure is a failed check, in the log and the textfile
        write_atomic(cfg["textfile"], textfile(cfg, now, None, False, phase, None))
        reason = str(getattr(exc, "pgerror", None) or exc).strip().replace("\n", " ")
        log(cfg, f"{head} status=error phase={phase} error={json.dumps(reason)}")
        traceback.print_exc(file=sys.stderr)
        sync_cron(cfg, now)
        return 2
    problems = []
    for t in tables:
        where = f"{t['schema']}.{t['table']}"
        if not t["exists"]:
            problems.append(f"{where}: table missing")
            continue
        if t["duplicate_rows"]:
            problems.append(f"{where}: {t['duplicate_rows']} duplicate rows")
        if not t["constraint_present"]:
            problems.append(f"{where}: no valid UNIQUE constraint on ({', '.join(t['natural_key'])})")
    clean = not problems
    write_atomic(cfg["textfile"], textfile(cfg, now, tables, True, phase, db_size))
    ledger_error = record(cfg, now, clean, problems,
                          {"phase": phase, "database_size": db_size, "tables": tables})
    dups = sum(int(t["duplicate_rows"] or 0) for t in tables)
    missing = sum(1 for t in tables if not t["constraint_present"])
    line = (f"{head} status={'clean' if clean else 'PROBLEM'} phase={phase} tables={len(tables)} "
            f"duplicate_rows={dups} missing_constraints={missing}")
    if problems:
        line += " problems=" + json.dumps("; ".join(problems))
    if ledger_error:
        line += " warning=" + json.dumps(ledger_error)
    log(cfg, line)
    sync_cron(cfg, now)
    return 0 if clean else 1


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg.setdefault("config_path", os.path.abspath(path))
    for key in ("name", "period_start", "cron_file", "textfile", "tables", "schema", "db"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing {key!r}")
    if not isinstance(cfg["tables"], list) or not all(isinstance(t, dict) and t.get("name") and t.get("natural_key")
                                                      for t in cfg["tables"]):
        raise SystemExit(f"{path}: 'tables' must be a list of {{name, natural_key}} objects")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="JSON config written by roles/monitor")
    ap.add_argument("--now", help="ISO 8601 time to use instead of the clock (also DEDUP_NOW)")
    sub = ap.add_subparsers(dest="command")
    sub.add_parser("run", help="check now (default)")
    sp = sub.add_parser("schedule", help="write or remove the cron file for the period; prints JSON")
    sp.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = ap.parse_args(argv)
    now = now_from(args.now)
    if args.command == "schedule":
        try:
            cfg = load_config(args.config)
        except FileNotFoundError:
            print(json.dumps({"changed": False, "phase": "none", "installed": False,
                              "msg": f"no config at {args.config}"}))
            return 0
        out = sync_cron(cfg, now, dry_run=args.dry_run)
        _, hourly_until, until = period(cfg)
        out.update(hourly_until=iso(hourly_until), until=iso(until), now=iso(now))
        if out["phase"] == "over" and not args.dry_run:
            out["removed"] = retire(cfg, now)
            out["changed"] = out["changed"] or bool(out["removed"])
        print(json.dumps(out))
        return 0
    return cmd_run(load_config(args.config), now)


if __name__ == "__main__":
    sys.exit(main())
