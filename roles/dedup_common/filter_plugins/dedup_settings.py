"""Checks of the shared settings that an argument spec cannot express (roles/dedup_common/tasks/settings.yml).

``settings | dedup_settings_problems`` returns one sentence per bad setting, each naming the setting (and the
dedup_tables entry), so the first play fails with every problem at once. ``spec | dedup_spec_options`` merges
the options of every entry point of a role's meta/argument_specs.yml for validate_argument_spec.
"""

from __future__ import annotations

import datetime as dt
import re

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _ident(problems: list[str], where: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where} must be a non-empty name, got {value!r}")
    elif len(value.encode()) > 63:
        problems.append(f"{where} {value!r} is longer than PostgreSQL's 63-byte limit")
    elif _CONTROL.search(value):
        problems.append(f"{where} {value!r} contains a control character")


def _regex(problems: list[str], where: str, value) -> None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a non-empty regular expression, got {value!r}")
        return
    try:
        re.compile(value)
    except re.error as exc:
        problems.append(f"{where} {value!r} is not a valid regular expression: {exc}")


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def dedup_settings_problems(s: dict) -> list[str]:
    """Problems of the dedup_common settings in ``s`` (a dict of the variables), [] when all is well."""
    problems: list[str] = []
    port = _int(s.get("dedup_db_port"))
    if port is None or not 1 <= port <= 65535:
        problems.append(f"dedup_db_port must be a port number (1-65535), got {s.get('dedup_db_port')!r}")
    timeout = _int(s.get("dedup_db_connect_timeout"))
    if timeout is None or timeout < 1:
        problems.append("dedup_db_connect_timeout must be at least 1 second (0 would wait forever), "
                        f"got {s.get('dedup_db_connect_timeout')!r}")
    retries = _int(s.get("dedup_wait_idle_retries"))
    if retries is None or retries < 0:
        problems.append(f"dedup_wait_idle_retries must be 0 or more, got {s.get('dedup_wait_idle_retries')!r}")
    for name in ("dedup_db_host", "dedup_db_name", "dedup_db_user", "dedup_etl_user", "dedup_env_name"):
        value = s.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must not be empty")
    _ident(problems, "dedup_schema", s.get("dedup_schema"))
    _ident(problems, "dedup_backup_schema", s.get("dedup_backup_schema"))
    if s.get("dedup_schema") and s.get("dedup_schema") == s.get("dedup_backup_schema"):
        problems.append("dedup_backup_schema must differ from dedup_schema "
                        "(the ledger and the backup tables are kept apart)")
    for name in ("dedup_backup_dir", "dedup_etl_dir"):
        value = s.get(name)
        if not isinstance(value, str) or not value.startswith("/"):
            problems.append(f"{name} must be an absolute path, got {value!r}")
    env = s.get("dedup_env_name")
    if isinstance(env, str) and "/" in env:
        problems.append(f"dedup_env_name {env!r} must not contain '/'")
    run_id = s.get("dedup_run_id")
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        problems.append("dedup_run_id must be letters, digits, '.', '_' and '-' (no leading '.' or '-'), "
                        f"got {run_id!r}")
    now = s.get("dedup_now")
    if now:
        try:
            dt.datetime.fromisoformat(str(now).strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            problems.append(f"dedup_now must be empty or an ISO 8601 time such as 2025-12-10T06:00:00Z, got {now!r}")
    _regex(problems, "dedup_etl_cron_pattern", s.get("dedup_etl_cron_pattern"))
    _regex(problems, "dedup_etl_process_pattern", s.get("dedup_etl_process_pattern"))
    ignore = s.get("dedup_ignore_columns")
    if not isinstance(ignore, list) or not all(isinstance(c, str) and c.strip() for c in ignore):
        problems.append(f"dedup_ignore_columns must be a list of column names, got {ignore!r}")

    tables = s.get("dedup_tables")
    if not isinstance(tables, list) or not tables:
        problems.append("dedup_tables must list at least one table with its natural key")
        return problems
    seen: dict[str, int] = {}
    for i, t in enumerate(tables):
        label = f"dedup_tables[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{label} must be a mapping with name and natural_key, got {t!r}")
            continue
        name = t.get("name")
        _ident(problems, f"{label}.name", name)
        if isinstance(name, str) and name:
            label = f"dedup_tables[{i}] ({name})"
            if name in seen:
                problems.append(f"{label}: table {name!r} is listed twice (also dedup_tables[{seen[name]}])")
            seen.setdefault(name, i)
        key = t.get("natural_key")
        if not isinstance(key, list) or not key:
            problems.append(f"{label}.natural_key must be a non-empty list of columns, got {key!r}")
        else:
            for col in key:
                _ident(problems, f"{label}.natural_key column", col)
            if len(set(key)) != len(key):
                problems.append(f"{label}.natural_key {key!r} names a column twice")
        if t.get("order_by") is not None:
            _ident(problems, f"{label}.order_by", t.get("order_by"))
    return problems


def _without_defaults(options: dict) -> dict:
    out = {}
    for name, attrs in options.items():
        attrs = {k: v for k, v in (attrs or {}).items() if k != "default"}
        if isinstance(attrs.get("options"), dict):
            attrs["options"] = _without_defaults(attrs["options"])
        out[name] = attrs
    return out


def dedup_spec_options(spec: dict, role: str | None = None) -> dict:
    """The options of every entry point of a role's argument_specs, merged (later entry points win), without
    their defaults: only the values actually set (inventory, -e) are checked; a default such as
    "{{ dedup_tables }}" would otherwise be validated untemplated.

    With ``role``, only the settings: options named ``<role>_*`` or ``dedup_*``. The others are another role's
    facts this role takes in (``preflight_plan`` in migrate's spec), which do not exist yet when the settings are
    checked; the role's own argument check at its start requires them."""
    out: dict = {}
    for entry in (spec or {}).get("argument_specs", {}).values():
        out.update((entry or {}).get("options") or {})
    if role:
        out = {k: v for k, v in out.items() if k.startswith((f"{role}_", "dedup_"))}
    return _without_defaults(out)


class FilterModule:
    def filters(self):
        return {"dedup_settings_problems": dedup_settings_problems, "dedup_spec_options": dedup_spec_options}
