#!/usr/bin/python
"""Find the pg_dump / pg_restore on the target that fit the server's major version (read-only)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_client_tools
short_description: Find a pg_dump and pg_restore that can handle the server's PostgreSQL major version
description:
  - Connects to read the server's version, then picks each client in C(tools) on the target. pg_dump refuses a
    server of a newer major version ("server version mismatch") and pg_restore cannot read archives of a newer
    pg_dump, so a client fits when its major version is the server's or newer; the same major is preferred,
    then the closest newer one. pg_restore must also be at least the major of the pg_dump picked, and is
    preferably the one next to it.
  - A configured value (C(pg_dump), C(pg_restore)) is checked, never replaced; when it is too old, missing or
    not a PostgreSQL client the module fails naming the variable (C(pg_dump_var), C(pg_restore_var)).
  - Otherwise it looks on PATH, then in C(bin_dirs), then in the usual per-version directories
    (/usr/lib/postgresql/<N>/bin, /usr/pgsql-<N>/bin, /opt/homebrew/opt/postgresql@<N>/bin,
    /usr/local/opt/postgresql@<N>/bin, /usr/local/pgsql/bin). Each candidate's major version is read from
    C(<bin> --version).
  - Only reads; supports check mode and never reports a change.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  tools:
    description: Which clients to find.
    type: list
    elements: str
    choices: [pg_dump, pg_restore]
    default: [pg_dump, pg_restore]
  pg_dump:
    description: The pg_dump the user configured (a path or a name on PATH); unset = find one.
    type: str
  pg_restore:
    description: The pg_restore the user configured (a path or a name on PATH); unset = find one.
    type: str
  pg_dump_var:
    description: Variable to name when the configured pg_dump does not fit or none is found.
    type: str
    default: backup_pg_dump
  pg_restore_var:
    description: Variable to name when the configured pg_restore does not fit or none is found.
    type: str
    default: backup_pg_restore
  bin_dirs:
    description: More directories to look in after PATH (e.g. the bin directory of a pip-installed server).
    type: list
    elements: path
    default: []
  missing:
    description:
      - What to do when no fitting client is found and none is configured. C(fail), or C(warn) (the result's
        entry for that tool is null; a configured client that does not fit always fails).
    type: str
    default: fail
    choices: [fail, warn]
"""

EXAMPLES = r"""
- name: Find pg_dump and pg_restore for this server
  pg_client_tools:
    pg_dump: "{{ backup_pg_dump | default(omit) }}"
    pg_restore: "{{ backup_pg_restore | default(omit) }}"
    bin_dirs: "{{ preflight_pg_bin_dirs }}"
    login_db: breezeway
  register: clients

- name: Use them
  ansible.builtin.set_fact:
    backup_pg_dump: "{{ clients.pg_dump.path }}"
    backup_pg_restore: "{{ clients.pg_restore.path }}"
"""

RETURN = r"""
server_version:
  description: The server's version (C(server_version) setting).
  returned: success
  type: str
  sample: "18.1"
server_major:
  description: The server's major version.
  returned: success
  type: str
  sample: "18"
pg_dump:
  description: The pg_dump picked (null with C(missing=warn) when none fits, or when not in C(tools)).
  returned: success
  type: dict
  contains:
    path: {description: Path of the executable., type: str}
    version: {description: Its C(--version) output., type: str}
    major: {description: Its major version., type: str}
    source: {description: "Where it was found: the variable, PATH, preflight_pg_bin_dirs, a usual dir.", type: str}
  sample: {path: /usr/lib/postgresql/18/bin/pg_dump, version: pg_dump (PostgreSQL) 18.1, major: "18", source: PATH}
pg_restore:
  description: The pg_restore picked, like C(pg_dump).
  returned: success
  type: dict
found:
  description: Every runnable client found per tool, in search order, with its major version.
  returned: always
  type: dict
searched:
  description: The directories looked in, in order.
  returned: always
  type: list
  elements: str
msg:
  description: What was picked, or what to set.
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_clients import find_clients, major_text
from ansible.module_utils.dedup_pg import connect, error_text, pg_common_argument_spec

try:
    import psycopg2
except ImportError:  # pragma: no cover
    psycopg2 = None


def server_version(module):
    conn = connect(module, autocommit=True, readonly=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version_num')::int, current_setting('server_version')")
            return cur.fetchone()
    except psycopg2.Error as exc:
        module.fail_json(msg="cannot read the server version: " + error_text(exc, module))
    finally:
        conn.close()


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        tools=dict(type="list", elements="str", choices=["pg_dump", "pg_restore"], default=["pg_dump", "pg_restore"]),
        pg_dump=dict(type="str"),
        pg_restore=dict(type="str"),
        pg_dump_var=dict(type="str", default="backup_pg_dump"),
        pg_restore_var=dict(type="str", default="backup_pg_restore"),
        bin_dirs=dict(type="list", elements="path", default=[]),
        missing=dict(type="str", default="fail", choices=["fail", "warn"]),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    num, version = server_version(module)
    configured = {"pg_dump": p["pg_dump"], "pg_restore": p["pg_restore"]}
    names = {"pg_dump": p["pg_dump_var"], "pg_restore": p["pg_restore_var"]}
    res = find_clients(num, p["tools"], configured, names, p["bin_dirs"])
    found = {tool: [{k: c[k] for k in ("path", "major", "source")} for c in cands]
             for tool, cands in res["found"].items()}
    picked = {tool: ({k: res[tool][k] for k in ("path", "version", "major", "source")} if res.get(tool) else None)
              for tool in ("pg_dump", "pg_restore")}
    result = dict(changed=False, server_version=version, server_major=major_text(num), found=found,
                  searched=res["searched"], **picked)
    hard = [text for kind, text in res["problems"] if kind == "configured"]
    soft = [text for kind, text in res["problems"] if kind == "missing"]
    if hard or (soft and p["missing"] == "fail"):
        module.fail_json(msg=f"The server is PostgreSQL {version}: " + "; ".join(hard + soft) + ".", **result)
    for pr in soft:
        module.warn(pr)
    result["msg"] = f"PostgreSQL {version}: " + ", ".join(
        f"{tool} {info['path']} ({info['major']}, from {info['source']})" for tool, info in picked.items() if info)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
