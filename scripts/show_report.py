#!/usr/bin/env python3
"""Print the before/after table of a dedup-rollout report (the latest one under a folder by default).

    python scripts/show_report.py --latest reports/lab
    python scripts/show_report.py reports/lab/20261125T210957Z/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def human(n) -> str:
    try:
        n = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def latest(folder: Path) -> Path:
    reports = sorted(folder.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        sys.exit(f"no report.json under {folder}")
    return reports[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="a report.json, or a folder with --latest")
    ap.add_argument("--latest", metavar="FOLDER", help="use the newest report under FOLDER")
    args = ap.parse_args()
    path = latest(Path(args.latest)) if args.latest else Path(args.path or "")
    if not path.is_file():
        sys.exit(f"not a report file: {path}")
    report = json.loads(path.read_text())
    print(f"\n{report['kind']} run {report['run_id']} on {report['environment']} -- {path.parent}/report.md")
    for db in report.get("databases", []):
        print(f"\n{db['host']}: {db['database']} at {db['server']} (deploy {db.get('deploy_id')})")
        if db.get("backup"):
            b = db["backup"]
            print(f"  backup: {b['path']} ({human(b.get('bytes'))}, sha256 {str(b.get('sha256'))[:16]}...)")
        rows = db.get("tables") or []
        if not rows:
            print("  nothing to do: no duplicates, every constraint present")
            continue
        head = ("table", "rows before", "rows after", "removed", "dups after",
                "size before", "size after", "constraint")
        table = [head] + [
            (t["table"], str(t["rows_before"]), str(t["rows_after"]), str(t["removed"]), str(t["duplicates_after"]),
             human(t["size_before"]), human(t["size_after"]), str(t["constraint"]))
            for t in rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        for i, r in enumerate(table):
            cells = (c.ljust(w) if j in (0, 7) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
            print("  " + "  ".join(cells).rstrip())
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        before = db.get("database_size_before")
        after = db.get("database_size_after")
        if after is not None:
            print(f"  database size: {human(before)} -> {human(after)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
