# -*- coding: utf-8 -*-
"""Naming and step parsing shared by the migration modules (pg_dedup_plan, pg_migrate_table)."""

from __future__ import annotations

import hashlib
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
