"""The end-of-run summary of a deploy or rollback report (report.json), as text and as a compact dict.

Pure Python (no Ansible import), shared by the play output (roles/report, roles/rollback_report: a debug task and
set_stats) and by scripts/show_report.py, so the table at the end of a run and the one show_report.py prints from
the report file are the same.

    {{ report_data | dedup_summary(report_dir ~ '/report.md') }}   -> the table as one string
    {{ report_data | dedup_summary_stats }}                       -> a dict for set_stats (AWX artifacts)
"""

from __future__ import annotations

import os


def human(n) -> str:
    """Bytes as B/KB/MB/GB/TB (1024-based, one decimal); anything else as text ('-' for None)."""
    if n is None:
        return "-"
    try:
        n = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _text(value) -> str:
    return "-" if value is None or value == "" else str(value)


def table(head: tuple[str, ...], rows: list[tuple], left: tuple[int, ...] = (0,)) -> list[str]:
    """Aligned columns: text columns (indexes in ``left``) left-aligned, numbers right-aligned, a rule under the
    head."""
    cells = [tuple(head)] + [tuple(_text(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                   .rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _num(value) -> float:
    """A number from a report field; '-', None and other non-numbers count as 0."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _seconds(value) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return _text(value)


def dedup_outcome(db: dict, etl: list[dict] | None = None, check_mode: bool = False, mode: str = "offline") -> dict:
    """One region's outcome of a deploy, from what its db host and its etl hosts left in their facts.

    ``db``: ``started`` (preflight planned it), ``work`` (there was something to do), ``failure`` (the db step's
    record: step, error, changed_tables, etl), ``recorded`` (the ledger task's result). ``etl``: one dict per etl
    host of the region: ``host``, ``ready`` (its pause went through), ``done`` (deploy and smoke went through),
    ``failure`` (the ETL step's message). Returns ``status`` (succeeded, nothing to do, checked, failed,
    unfinished, not started), ``step``, ``error`` and ``etl`` (what the region's ETL cron is now).
    """
    etl = etl or []
    cron_touched = mode == "offline" and bool(db.get("work"))
    if not db.get("started"):
        return {"status": "not started", "step": "preflight", "error": None, "etl": "untouched"}
    failure = db.get("failure")
    if failure:
        not_ready = [e["host"] for e in etl if not e.get("ready")]
        if not etl:
            cron = "none"
        elif not_ready:
            cron = "paused on " + ", ".join(not_ready) + " (the pause did not finish)"
        elif failure.get("changed_tables"):
            cron = "paused"
        else:
            cron = "resumed" if cron_touched else "untouched"
        return {"status": "failed", "step": failure.get("step") or "database step", "error": failure.get("error"),
                "etl": cron, "changed_tables": list(failure.get("changed_tables") or [])}
    for e in etl:
        if e.get("failure"):
            return {"status": "failed", "step": "ETL deploy or smoke test on " + str(e.get("host")),
                    "error": e["failure"], "etl": "paused" if cron_touched else "untouched"}
    cron = ("resumed" if cron_touched else "untouched") if etl else "none"
    if check_mode:
        return {"status": "checked", "step": None, "error": None, "etl": "untouched"}
    if not db.get("work"):
        return {"status": "nothing to do", "step": None, "error": None, "etl": cron}
    recorded = db.get("recorded") or {}
    if recorded and not recorded.get("skipped") and not recorded.get("failed"):
        return {"status": "succeeded", "step": None, "error": None, "etl": cron}
    return {"status": "unfinished", "step": None, "error": None, "etl": cron}


def dedup_etl_state(hostvars_of_host) -> dict:
    """What dedup_outcome needs of one etl host's facts (a host's hostvars)."""
    hv = hostvars_of_host
    return {"host": hv.get("inventory_hostname"), "ready": bool(hv.get("dedup_etl_ready")),
            "done": bool(hv.get("dedup_etl_done")), "failure": hv.get("dedup_etl_failure")}


def _deploy_lines(db: dict) -> list[str]:
    where = f" at {db['server']}" if db.get("server") else ""
    region = f"region {db['region']}: " if db.get("region") else ""
    lines = [f"{region}{db.get('host', '?')}: {db.get('database', '?')}{where} (deploy {db.get('deploy_id')})"]
    outcome = db.get("outcome") or {}
    if outcome.get("status"):
        line = f"  outcome: {outcome['status'].upper()}"
        if outcome.get("step"):
            line += f" at {outcome['step']}"
        if outcome.get("etl") and outcome["etl"] != "none":
            line += f"; ETL cron {outcome['etl']}"
        lines.append(line)
        if outcome.get("error"):
            lines.append(f"  error: {str(outcome['error'])[:600]}")
    backup = db.get("backup")
    if backup:
        sha = str(backup.get("sha256") or "")
        lines.append(f"  backup: {backup.get('path')} ({human(backup.get('bytes'))}"
                     + (f", sha256 {sha[:16]}..." if sha else "") + ")")
    rows = db.get("tables") or []
    if not rows and outcome.get("status") == "failed":
        changed = outcome.get("changed_tables") or []
        lines.append("  changed before the failure: " + ", ".join(changed) if changed else "  nothing was changed")
        return lines
    if not rows:
        lines.append("  nothing to do: no duplicates, every constraint present")
        return lines
    head = ("table", "rows before", "rows after", "removed", "dups after", "size before", "size after", "seconds",
            "constraint")
    lines += ["  " + line for line in table(head, [
        (t.get("table"), t.get("rows_before"), t.get("rows_after"), t.get("removed"), t.get("duplicates_after"),
         human(t.get("size_before")), human(t.get("size_after")), _seconds(t.get("seconds")), t.get("constraint"))
        for t in rows], left=(0, 8))]
    removed = int(sum(_num(t.get("removed")) for t in rows))
    seconds = sum(_num(t.get("seconds")) for t in rows)
    lines.append(f"  removed {removed} row(s) in {len(rows)} table(s), {seconds:.1f} s of migration")
    if db.get("database_size_after") is not None:
        before, after = human(db.get("database_size_before")), human(db.get("database_size_after"))
        lines.append(f"  database size: {before} -> {after}")
    return lines


def _rollback_lines(db: dict) -> list[str]:
    where = f" at {db['server']}" if db.get("server") else ""
    region = f"region {db['region']}: " if db.get("region") else ""
    head_line = f"{region}{db.get('host', '?')}: {db.get('database', '?')}{where}"
    if not db.get("target_deploy"):
        last = db.get("last_deploy") or {}
        if last.get("run_id"):
            return [f"{head_line}: nothing to roll back, the last deploy {last['run_id']} is already "
                    f"{str(last.get('status', '')).replace('_', ' ')}"]
        return [f"{head_line}: nothing to roll back (no deploy in the ledger)"]
    lines = [f"{head_line} (deploy {db['target_deploy']} rolled back; its status before: "
             f"{db.get('target_status_before')})"]
    if db.get("dump_used"):
        lines.append(f"  removed rows read from the verified dump {db.get('dump')}")
    else:
        kept = f"; dump kept: {db['dump']}" if db.get("dump") else ""
        lines.append("  removed rows read from the backup tables" + kept)
    if db.get("already_rolled_back"):
        lines.append("  already rolled back before this run: " + ", ".join(db["already_rolled_back"]))
    rows = db.get("tables") or []
    if not rows:
        lines.append("  no table left to undo")
        return lines
    head = ("table", "removed by deploy", "put back", "already there", "source", "constraint dropped")
    lines += ["  " + line for line in table(head, [
        (t.get("table"), t.get("rows_removed") or 0, t.get("restored"), t.get("present"), t.get("source"),
         t.get("constraint") if t.get("constraint_dropped") else "-")
        for t in rows], left=(0, 4, 5))]
    restored = int(sum(_num(t.get("restored")) for t in rows))
    lines.append(f"  put back {restored} row(s) in {len(rows)} table(s)")
    return lines


def dedup_summary(report: dict, report_path: str | None = None) -> str:
    """The before/after summary of a deploy or rollback report, as printed at the end of the run."""
    kind = report.get("kind", "deploy")
    check = " (check mode: nothing was changed)" if report.get("check_mode") else ""
    where = f" -- {report_path}" if report_path else ""
    lines = [f"{kind} run {report.get('run_id')} on {report.get('environment')}{check}{where}"]
    for db in report.get("databases") or []:
        lines.append("")
        lines += _rollback_lines(db) if kind == "rollback" else _deploy_lines(db)
    etl = report.get("etl_hosts") or []
    if etl:
        lines.append("")
    for e in etl:
        if kind == "rollback":
            now = e.get("release_now") or "-"
            before = e.get("release_before_rollback") or "-"
            what = f"{before} -> {now}" if e.get("switched") else f"stays {now}"
            resumed = len(e.get("resumed_lines") or [])
            lines.append(f"ETL {e.get('host')}: current {what}; {resumed} cron line(s) resumed")
        else:
            before = e.get("release_before") or "-"
            now = e.get("release_now") or before
            smoke = (e.get("smoke") or {}).get("status")
            lines.append(f"ETL {e.get('host')}: release {before} -> {now}"
                         + (f"; smoke test {smoke}" if smoke else "")
                         + f"; {len(e.get('paused_lines') or [])} cron line(s) paused during the run")
    if not report.get("databases") and not etl:
        lines.append("")
        lines.append("no database or ETL host in this run")
    outcomes = [(db.get("region") or db.get("host"), (db.get("outcome") or {}).get("status"))
                for db in report.get("databases") or [] if (db.get("outcome") or {}).get("status")]
    if len(outcomes) > 1:
        lines.append("")
        lines.append("regions: " + "; ".join(f"{name} {status}" for name, status in outcomes))
    return "\n".join(lines)


def dedup_summary_stats(report: dict, report_path: str | None = None) -> dict:
    """A compact summary for set_stats (AWX shows it as the job's artifacts)."""
    out = {"kind": report.get("kind"), "run_id": report.get("run_id"), "environment": report.get("environment"),
           "check_mode": bool(report.get("check_mode")), "report": report_path, "databases": []}
    for db in report.get("databases") or []:
        rows = db.get("tables") or []
        if report.get("kind") == "rollback":
            out["databases"].append({
                "host": db.get("host"), "database": db.get("database"), "deploy": db.get("target_deploy"),
                "rows_put_back": int(sum(_num(t.get("restored")) for t in rows)),
                "tables": {t.get("table"): {"put_back": t.get("restored"), "source": t.get("source"),
                                            "constraint_dropped": t.get("constraint") if t.get("constraint_dropped")
                                            else None} for t in rows},
            })
        else:
            out["databases"].append({
                "host": db.get("host"), "database": db.get("database"), "deploy": db.get("deploy_id"),
                "region": db.get("region") or None, "outcome": (db.get("outcome") or {}).get("status"),
                "backup": (db.get("backup") or {}).get("path"),
                "rows_before": int(sum(_num(t.get("rows_before")) for t in rows)),
                "rows_after": int(sum(_num(t.get("rows_after")) for t in rows)),
                "rows_removed": int(sum(_num(t.get("removed")) for t in rows)),
                "database_size_before": db.get("database_size_before"),
                "database_size_after": db.get("database_size_after"),
                "tables": {t.get("table"): {"rows_before": t.get("rows_before"), "rows_after": t.get("rows_after"),
                                            "removed": t.get("removed"), "size_before": t.get("size_before"),
                                            "size_after": t.get("size_after"), "seconds": t.get("seconds"),
                                            "constraint": t.get("constraint")} for t in rows},
            })
    return out


def _entry(tables, name):
    """The entry of ``tables`` (a list of dicts with 'table') for table ``name``, or None."""
    return next((t for t in tables or [] if t.get("table") == name), None)


def dedup_table_summary(before: dict, plan: dict, after: dict | None = None, after_plan: dict | None = None,
                        ledger_tables: list | None = None, backup_schema: str = "", check_mode: bool = False) -> list:
    """One row per table for the report (roles/validate/tasks/summary.yml): rows and duplicates before (preflight's
    count) and after (validation's), the sizes from the plans, the seconds and backup table from the ledger, and the
    constraint in place. In check mode the rows after are what the migration would leave (``N (would)`` removed);
    without ``after`` (validation did not run) the rows before."""
    out = []
    for b in (before or {}).get("tables") or []:
        name = b["table"]
        a = _entry((after or {}).get("tables"), name) if after else None
        p0 = _entry((plan or {}).get("tables"), name) or {}
        p1 = _entry((after_plan or {}).get("tables"), name) if after_plan else None
        led = [t for t in ledger_tables or [] if t.get("table_name") == name]
        if a and not check_mode:
            rows_after, removed, dups_after = a["total_rows"], b["total_rows"] - a["total_rows"], a["duplicate_rows"]
        elif check_mode:  # nothing changed: what the migration would leave (validation counted the same rows)
            rows_after, removed, dups_after = (b["total_rows"] - b["duplicate_rows"], f"{b['duplicate_rows']} (would)",
                                               0)
        else:
            rows_after, removed, dups_after = b["total_rows"], 0, b["duplicate_rows"]
        existing = (p1 or {}).get("existing_constraint") or p0.get("existing_constraint")
        out.append({
            "table": name,
            "rows_before": b["total_rows"],
            "rows_after": rows_after,
            "removed": removed,
            "duplicates_after": dups_after,
            "size_before": p0.get("size_before"),
            "size_after": p1["size_before"] if p1 else p0.get("size_before"),
            "seconds": led[0]["seconds"] if led and led[0].get("seconds") is not None else "-",
            "constraint": existing["name"] if existing else "missing",
            "backup_table": f"{backup_schema}.{led[0]['backup_table']}" if led and led[0].get("backup_table") else None,
        })
    return out


# --------------------------------------------------------------------------- what each host did (report.json)

_REGIONS = None


def _regions():
    """plugins/filter/dedup.py (the region rule), loaded by its path when first needed: it imports Ansible, this file
    does not (scripts/show_report.py uses it without Ansible)."""
    global _REGIONS
    if _REGIONS is None:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("dedup_rollout_report_regions",
                                                      Path(__file__).resolve().with_name("dedup.py"))
        _REGIONS = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_REGIONS)
    return _REGIONS


def _tables(hv, check_mode: bool) -> list:
    """The host's table rows: validation's summary, or, where validation did not run (nothing to do), the same
    summary of the tables as preflight found them."""
    tables = hv.get("validate_report_tables")
    if tables is None and hv.get("preflight_before") is not None:
        tables = dedup_table_summary(hv["preflight_before"], hv["preflight_plan"],
                                     backup_schema=hv.get("dedup_backup_schema", ""), check_mode=check_mode)
    return tables or []


def _server(hv, defaults: dict) -> str:
    host = hv.get("dedup_db_host", defaults.get("dedup_db_host"))
    return f"{host}:{hv.get('dedup_db_port', defaults.get('dedup_db_port'))}"


def dedup_report_databases(groups, hostvars, defaults: dict, check_mode: bool = False) -> list:
    """The ``databases`` of a deploy's report.json: every db host that got as far as preflight's plan, with what it
    did (backup, tables, migration steps, ETL report) and its outcome (dedup_outcome). ``defaults``: the play's
    dedup_db_name, dedup_db_host, dedup_db_port, dedup_mode and dedup_backup_mode, for a host that has none."""
    regions = _regions()
    out = []
    for h in groups.get("db") or []:
        hv = hostvars[h]
        if hv.get("preflight_plan") is None:
            continue
        after = hv.get("validate_after_plan")
        mode = hv.get("dedup_mode", defaults.get("dedup_mode"))
        etl = [dedup_etl_state(hostvars[e]) for e in regions.dedup_region_hosts(h, groups, "etl")]
        out.append({
            "host": h,
            "database": hv.get("dedup_db_name", defaults.get("dedup_db_name")),
            "server": _server(hv, defaults),
            "deploy_id": hv.get("preflight_deploy_id"),
            "work": hv.get("preflight_work", False),
            "mode": mode,
            "backup_mode": hv.get("dedup_backup_mode", defaults.get("dedup_backup_mode")),
            "backup": hv.get("backup_result"),
            "database_size_before": hv["preflight_plan"]["server"]["database_size"],
            "database_size_after": after["server"]["database_size"] if after is not None else None,
            "tables": _tables(hv, check_mode),
            "migration": hv.get("dedup_migration_steps") or [],
            "etl": hv.get("dedup_etl_report"),
            "region": regions.dedup_region_name(h, groups),
            "outcome": dedup_outcome({"started": True, "work": _bool(hv.get("preflight_work", False)),
                                      "failure": hv.get("dedup_db_failure"), "recorded": hv.get("dedup__recorded")},
                                     etl, check_mode, mode),
        })
    return out


def dedup_report_etl(groups, hostvars) -> list:
    """The ``etl_hosts`` of a deploy's report.json: per etl host, the paused cron lines, the releases and the smoke
    test."""
    out = []
    for h in groups.get("etl") or []:
        hv = hostvars[h]
        release_dir = hv.get("etl_deploy_release_dir")
        out.append({"host": h, "paused_lines": hv.get("etl_pause_paused_lines") or [],
                    "release_before": hv.get("etl_deploy_previous_release"),
                    "release_now": os.path.basename(release_dir) if release_dir is not None else None,
                    "smoke": hv.get("etl_smoke_results")})
    return out


def dedup_rollback_databases(groups, hostvars, defaults: dict) -> list:
    """The ``databases`` of a rollback's report.json: every db host that looked for a deploy to undo."""
    regions = _regions()
    out = []
    for h in groups.get("db") or []:
        hv = hostvars[h]
        if "restore_target" not in hv:
            continue
        target = hv.get("restore_target")
        last = hv.get("restore_last_deploy")
        out.append({
            "host": h,
            "region": regions.dedup_region_name(h, groups),
            "rollback_run_id": hv.get("restore_run_id"),
            "database": hv.get("dedup_db_name", defaults.get("dedup_db_name")),
            "server": _server(hv, defaults),
            "last_deploy": {"run_id": last["run_id"], "status": last["status"]} if last else None,
            "target_deploy": target["run_id"] if target else None,
            "target_status_before": target["status"] if target else None,
            "dump": target["dump_path"] if target else None,
            "dump_used": hv.get("restore_needs_dump", False),
            "tables": hv.get("restore_done") or [],
            "already_rolled_back": [t["table_name"] for t in hv.get("restore_tables") or []
                                    if t.get("status") == "rolled_back"],
        })
    return out


def dedup_rollback_etl(groups, hostvars) -> list:
    """The ``etl_hosts`` of a rollback's report.json: per etl host the rollback looked at, the release before and now
    and the cron lines resumed."""
    regions = _regions()
    out = []
    for h in groups.get("etl") or []:
        hv = hostvars[h]
        if "rollback_etl_current" not in hv:
            continue
        switched = _bool(hv.get("rollback_etl_switch", False))
        out.append({"host": h, "region": regions.dedup_region_name(h, groups),
                    "release_before_rollback": hv.get("rollback_etl_current"), "switched": switched,
                    "release_now": hv.get("rollback_etl_to") if switched else hv.get("rollback_etl_current"),
                    "resumed_lines": hv.get("etl_resume_restored_lines") or []})
    return out


def _bool(value) -> bool:
    """Jinja's ``bool`` filter: true for True, 'yes', 'true', '1', 'on', 1."""
    if isinstance(value, str):
        return value.strip().lower() in ("yes", "true", "1", "on", "y")
    return bool(value)


class FilterModule:
    def filters(self):
        return {"dedup_summary": dedup_summary, "dedup_summary_stats": dedup_summary_stats,
                "dedup_outcome": dedup_outcome, "dedup_etl_state": dedup_etl_state,
                "dedup_table_summary": dedup_table_summary, "dedup_report_databases": dedup_report_databases,
                "dedup_report_etl": dedup_report_etl, "dedup_rollback_databases": dedup_rollback_databases,
                "dedup_rollback_etl": dedup_rollback_etl}
