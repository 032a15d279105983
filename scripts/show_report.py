#!/usr/bin/env python3
"""Print the summary of a dedup-rollout report, deploy or rollback (the newest one under a folder with --latest).

    python scripts/show_report.py --latest reports/lab
    python scripts/show_report.py reports/lab/20261125T210957Z/report.json
    python scripts/show_report.py reports/lab/20261125T210957Z-rollback/20261125T211502Z/report.json

The same table ends every deploy_dedup.yml and rollback.yml run (plugins/filter/report.py formats both).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "filter"))

from report import dedup_summary  # noqa: E402  (plugins/filter/report.py: pure Python, shared with the play)


def _finished(path: Path) -> tuple[str, float]:
    """Sort key: the report's own finish time (ISO 8601 UTC sorts as text), then the file's mtime."""
    try:
        finished = str(json.loads(path.read_text()).get("finished") or "")
    except (OSError, ValueError):
        finished = ""
    return finished, path.stat().st_mtime


def latest(folder: Path) -> Path:
    """The newest report.json under FOLDER: deploys (<run>/report.json) and rollbacks (<run>-rollback/<time>/)."""
    reports = sorted(folder.rglob("report.json"), key=_finished)
    if not reports:
        sys.exit(f"no report.json under {folder}")
    return reports[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="a report.json (or its directory), or a folder with --latest")
    ap.add_argument("--latest", metavar="FOLDER", help="use the newest report (deploy or rollback) under FOLDER")
    args = ap.parse_args(argv)
    path = latest(Path(args.latest)) if args.latest else Path(args.path or "")
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        sys.exit(f"not a report file: {path}")
    try:
        report = json.loads(path.read_text())
    except ValueError as exc:
        sys.exit(f"{path}: not a report ({exc})")
    print("\n" + dedup_summary(report, str(path.parent / "report.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
