"""Breezeway ETL configuration: what each entity loads, and the natural key of each child table.

Release v2: ``natural_keys.json`` in the release directory (rendered at deploy time from the
rollout's ``dedup_tables``) overrides the defaults below: ``{"<table>": ["col", ...], ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "breezeway"

# Parents are upserted on their own natural key (region_code, source_id); children point at the
# parent's surrogate key (``id``) through their ``fk`` column.
PARENTS = {
    "properties": {"table": "properties", "label": "property", "natural_key": ["region_code", "source_id"]},
    "tasks": {"table": "tasks", "label": "task", "natural_key": ["region_code", "source_id"]},
    "reservations": {"table": "reservations", "label": "reservation", "natural_key": ["region_code", "source_id"]},
}

# Child tables, in load order. ``payload`` lists (column, kind); kinds are produced by fixture_api.
CHILD_TABLES = {
    "property_photos": {
        "entity": "properties",
        "fk": "property_pk",
        "child_id": "photo_id",
        "fanout": 4,
        "payload": [("url", "text"), ("width", "int"), ("size_mb", "numeric"), ("meta", "jsonb"),
                    ("taken_at", "timestamptz")],
        "natural_key": ["property_pk", "photo_id"],
    },
    "task_requirements": {
        "entity": "tasks",
        "fk": "task_pk",
        "child_id": "requirement_id",
        "fanout": 4,
        "payload": [("name", "text"), ("quantity", "int"), ("is_done", "bool"), ("cost", "numeric"),
                    ("details", "jsonb"), ("due_at", "timestamptz")],
        "natural_key": ["task_pk", "requirement_id"],
    },
    "task_assignments": {
        "entity": "tasks",
        "fk": "task_pk",
        "child_id": "assignee_id",
        "fanout": 1,
        "payload": [("role", "text"), ("minutes", "int"), ("rate", "numeric"), ("meta", "jsonb"),
                    ("assigned_at", "timestamptz")],
        "natural_key": ["task_pk", "assignee_id"],
    },
    "task_photos": {
        "entity": "tasks",
        "fk": "task_pk",
        "child_id": "photo_id",
        "fanout": 2,
        "payload": [("url", "text"), ("width", "int"), ("meta", "jsonb"), ("taken_at", "timestamptz")],
        "natural_key": ["task_pk", "photo_id"],
    },
    "task_comments": {
        "entity": "tasks",
        "fk": "task_pk",
        "child_id": "comment_id",
        "fanout": 1,
        "payload": [("region_code", "region"), ("body", "text"), ("author_id", "int"), ("meta", "jsonb"),
                    ("posted_at", "timestamptz")],
        "natural_key": ["task_pk", "comment_id"],
    },
    "task_tags": {
        "entity": "tasks",
        "fk": "task_pk",
        "child_id": "tag_pk",
        "fanout": 2,
        "payload": [("label", "text"), ("weight", "numeric")],
        "natural_key": ["task_pk", "tag_pk"],
    },
    "reservation_guests": {
        "entity": "reservations",
        "fk": "reservation_pk",
        "child_id": "guest_id",
        "fanout": 2,
        "payload": [("full_name", "text"), ("age", "int"), ("balance", "numeric"), ("prefs", "jsonb"),
                    ("checkin_at", "timestamptz")],
        "natural_key": ["reservation_pk", "guest_id"],
    },
}

ENTITIES = tuple(PARENTS)


def children_of(entity: str) -> list[str]:
    return [name for name, cfg in CHILD_TABLES.items() if cfg["entity"] == entity]


def load_natural_keys(release_dir: Path) -> dict[str, list[str]]:
    """Natural key per child table: natural_keys.json when present, else the defaults above."""
    keys = {name: list(cfg["natural_key"]) for name, cfg in CHILD_TABLES.items()}
    path = Path(release_dir) / "natural_keys.json"
    if path.exists():
        with open(path) as fh:
            override = json.load(fh)
        if not isinstance(override, dict):
            raise ValueError(f"{path}: expected an object of table -> [columns]")
        for table, cols in override.items():
            if table not in CHILD_TABLES:
                continue  # a table this ETL does not load
            if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
                raise ValueError(f"{path}: {table}: expected a non-empty list of column names")
            keys[table] = list(cols)
    return keys
