# -*- coding: utf-8 -*-
"""Naming and step parsing shared by the migration modules (pg_dedup_plan, pg_migrate_table)."""

from __future__ import annotations

import hashlib
import json
import re

STEP_RE = re.compile(r"^-- @step (?P<name>[a-z_]+)\s*$", re.M)


def backup_table_name(table, run_id):
    """<table>__<run id>, shortened with a hash to fit 63 bytes (same rule as the dedup_backup_name filter)."""
    name = "%s__%s" % (table, run_id)
    if len(name.encode("utf-8")) <= 63:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    head = table.encode("utf-8")[: 63 - len(run_id) - 12].decode("utf-8", "ignore")
    return "%s_%s__%s" % (head, digest, run_id)


def split_steps(text):
    """Split a rendered migration into [(step name, sql)], dropping the BEGIN/COMMIT the module manages."""
    steps = []
    matches = list(STEP_RE.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end():end]
        body = re.sub(r"^\s*(BEGIN|COMMIT)\s*;\s*$", "", body, flags=re.M | re.I).strip()
        if body:
            steps.append((m.group("name"), body))
    return steps


# What each step of sql/migrate_table.sql.j2 does, for progress lines (library/pg_migrate_progress.py).
STEP_TEXT = {
    "settings": "setting the session's timeouts and memory",
    "lock": "locking the table (ACCESS EXCLUSIVE, within lock_timeout)",
    "snapshot_guard": "checking that no older snapshot could see the table empty",
    "keep": "building the keep-set (one row per natural key: a full scan and hash aggregate)",
    "analyze_keep": "analysing the keep-set",
    "backup": "copying the rows to remove into the backup table",
    "stash": "copying the kept rows aside",
    "trigger_off": "disabling the table's user triggers for the reload",
    "truncate": "truncating the table (new empty file, same OID)",
    "reload": "re-inserting the kept rows",
    "trigger_on": "re-enabling the table's triggers",
    "snapshot_recheck": "checking again, just before the commit, that no older snapshot could see the table empty",
    "delete": "deleting the duplicates",
    "ledger": "recording the table in the ledger",
    "retry_wait": "waiting to retry after a lock timeout (no lock held)",
}

MARKER_PREFIX = "/* dedup-rollout "


def step_marker(run_id, schema, table, step, number, total, attempt):
    """A leading SQL comment naming the step, so pg_stat_activity.query shows where a migration is.

    JSON in a C comment: the only sequence that could end the comment early, ``*/``, is written ``*\\/``
    (a valid JSON escape), so hostile identifiers cannot break out of it.
    """
    body = json.dumps({"run": run_id, "schema": schema, "table": table, "step": step, "n": number,
                       "of": total, "attempt": attempt}, ensure_ascii=True, sort_keys=True)
    return MARKER_PREFIX + body.replace("*/", "*\\/") + " */\n"


def parse_marker(query):
    """The dict of a step marker at the start of ``query``, or None."""
    if not query or not query.startswith(MARKER_PREFIX):
        return None
    end = query.find(" */", len(MARKER_PREFIX))
    if end < 0:
        return None
    try:
        data = json.loads(query[len(MARKER_PREFIX):end])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
