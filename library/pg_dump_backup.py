#!/usr/bin/python
"""pg_dump of a database that becomes the backup only when it is complete and read back whole."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_dump_backup
short_description: Take a pg_dump that is the backup only once it is complete, verified and on disk
description:
  - C(action=dump) runs pg_dump into C(<path>.partial-<stamp>-<pid>) next to C(path), with the password only in
    the child's environment (C(PGPASSWORD); never argv, never a file), C(PGAPPNAME=dedup-rollout/pg_dump) and
    C(ssl_mode)/C(connect_timeout)/C(ssl_rootcert)/C(ssl_cert)/C(ssl_key) as C(PGSSLMODE)/C(PGCONNECT_TIMEOUT)/
    C(PGSSLROOTCERT)/C(PGSSLCERT)/C(PGSSLKEY), so C(verify-full) holds for pg_dump as for the modules.
  - The archive is then read whole (C(pg_restore --file=/dev/null), every data block) and its table of contents
    (C(pg_restore --list)) must hold C(TABLE DATA <schema> <table>) for each of C(tables). Only then is it made
    owner-only (file 0600; directory 0700 with 0600 files), fsync'ed and renamed to C(path) in one step.
  - A file already at C(path) is never accepted by its name; it is moved to C(<path>.unverified-<UTC stamp>) and
    named in the result and a warning. C(<path>.partial-*) left by killed runs are removed and named.
  - Before pg_dump starts, the write counters of C(tables) (C(n_tup_ins + n_tup_upd + n_tup_del) from
    C(pg_stat_user_tables)) and the database's C(stats_reset) are read and returned, so that a resumed deploy
    can tell whether rows were written after its dump.
  - On failure the partial file is removed and the message quotes pg_dump/pg_restore and names the cause they
    state (permission, disk full, version mismatch); nothing is guessed.
  - C(action=check) measures an existing dump (size, sha256 computed as the ledger records it), compares it with
    C(sha256), and lists the C(compare_tables) whose write counters differ from C(table_writes). Read-only.
  - Check mode changes nothing and says what would be dumped, removed and set aside.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  action:
    description: C(dump) takes a new dump; C(check) measures an existing one and compares write counters.
    type: str
    default: dump
    choices: [dump, check]
  path:
    description: Final path of the dump (a file for C(custom), a directory for C(directory)).
    type: path
    required: true
  format:
    description: pg_dump format.
    type: str
    default: custom
    choices: [custom, directory]
  jobs:
    description: Parallel jobs (C(directory) format only).
    type: int
    default: 2
  compress:
    description: Compression level (pg_dump C(--compress)).
    type: int
    default: 5
  pg_dump:
    description: pg_dump executable (the server's major version or newer).
    type: str
    default: pg_dump
  pg_restore:
    description: pg_restore executable used to read the dump back.
    type: str
    default: pg_restore
  schema:
    description: Schema of C(tables).
    type: str
    required: true
  tables:
    description: The managed tables; the dump must hold the data of each.
    type: list
    elements: str
    default: []
  exclude_schema:
    description: Schema left out of the dump (the ledger and backup tables).
    type: str
    default: dedup_rollout
  sha256:
    description: C(action=check) the sha256 the ledger recorded for C(path).
    type: str
  table_writes:
    description: C(action=check) the write counters recorded with the dump (table -> counter).
    type: dict
  stats_reset:
    description: C(action=check) the database's C(stats_reset) recorded with the dump.
    type: str
  compare_tables:
    description: C(action=check) tables whose write counters must still equal C(table_writes).
    type: list
    elements: str
    default: []
  run_lock_id:
    description:
      - Run id of the play's pg_run_lock. While pg_dump and pg_restore run, the module checks every couple of
        seconds that the lock's holder session is still there (and its own parent process); once the play is gone
        it kills them, removes the partial output and fails. Empty = only the parent process is watched.
    type: str
    default: ""
notes:
  - Needs psycopg2, pg_dump and pg_restore on the target. On Linux pg_dump and pg_restore die with the module.
"""

EXAMPLES = r"""
- name: Dump, verify and publish the backup
  pg_dump_backup:
    path: /var/backups/dedup-rollout/breezeway-20251202T010000Z.dump
    schema: breezeway
    tables: [task_requirements, property_photos]
    exclude_schema: dedup_rollout
  register: dump

- name: Check the recorded dump of a resumed deploy
  pg_dump_backup:
    action: check
    path: /var/backups/dedup-rollout/breezeway-20251202T010000Z.dump
    schema: breezeway
    sha256: "{{ run.dump_sha256 }}"
    table_writes: "{{ run.details.dump_table_writes }}"
    compare_tables: [property_photos]
"""

RETURN = r"""
path:
  description: The final path of the dump.
  returned: always
  type: str
bytes:
  description: Size of the dump (a directory like C(du -sb)).
  returned: when the dump exists (not in check mode)
  type: int
sha256:
  description: sha256 of the file; for a directory, of the sorted C(sha256sum) lines of its files.
  returned: when the dump exists (not in check mode)
  type: str
format:
  description: pg_dump format.
  returned: always
  type: str
verified_entries:
  description: Table-of-contents entries of the verified dump.
  returned: action=dump, not in check mode
  type: int
argv:
  description: The pg_dump command line that was run (no password in it; that is passed in C(PGPASSWORD)).
  returned: action=dump, not in check mode
  type: list
  elements: str
removed_partials:
  description: C(<path>.partial-*) left by killed runs, removed (check mode, would be removed).
  returned: action=dump
  type: list
set_aside:
  description: Where a file found at C(path) was moved (C(<path>.unverified-<stamp>)), or null.
  returned: action=dump
  type: str
table_writes:
  description: Write counter per table (inserted + updated + deleted tuples), read before the dump started.
  returned: always
  type: dict
stats_reset:
  description: The database's statistics reset time when the counters were read (null = never reset).
  returned: always
  type: str
exists:
  description: Whether C(path) exists (action=check).
  returned: action=check
  type: bool
matches:
  description: Whether the measured sha256 equals C(sha256) (action=check).
  returned: action=check
  type: bool
stale:
  description: Tables of C(compare_tables) that may have rows the dump lacks, each with C(recorded), C(now), C(reason).
  returned: action=check
  type: list
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_dump import (
    PARTIAL,
    UNVERIFIED,
    child_env,
    connection_args,
    data_relations,
    describe_failure,
    measure,
    partials,
    publish,
    remove,
    run,
    seal,
    set_aside,
    stale_tables,
    table_writes,
    utc_stamp,
    verify,
)
from ansible.module_utils.dedup_pg import (
    DedupPgError,
    PlayWatch,
    connect,
    error_text,
    pg_common_argument_spec,
    validate_identifier,
)


class DumpBackup:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.final = os.path.abspath(self.p["path"])

    def counters(self, tables, keep_open=False):
        conn = connect(self.module, autocommit=True, readonly=True, application_name="pg_dump_backup")
        try:
            cur = conn.cursor()
            writes, reset = table_writes(cur, self.p["schema"], tables)
            cur.execute("SELECT pg_catalog.pg_database_size(current_database())")
            size = cur.fetchone()[0]
        finally:
            if not keep_open:
                conn.close()
        return writes, reset, size, conn

    def check(self):
        p = self.p
        writes, reset, _size, _conn = self.counters(p["compare_tables"])
        out = {"changed": False, "path": self.final, "format": p["format"], "exists": os.path.exists(self.final),
               "table_writes": writes, "stats_reset": reset,
               "stale": stale_tables(p["table_writes"], p["stats_reset"], writes, reset)}
        if out["exists"]:
            out["bytes"], out["sha256"] = measure(self.final)
            out["matches"] = bool(p["sha256"]) and out["sha256"] == p["sha256"]
        else:
            out["matches"] = False
        return out

    def dump(self):
        p = self.p
        module = self.module
        stamp = utc_stamp()
        leftovers = partials(self.final)
        exists = os.path.lexists(self.final)
        # Read before pg_dump's snapshot: a write in between counts as "since the dump" (a needless new dump on
        # resume), never the other way round. The connection stays open, idle, to watch the play.
        writes, reset, size, conn = self.counters(p["tables"], keep_open=True)
        watch = PlayWatch(p["run_lock_id"], every=2.0)
        cur = conn.cursor()
        relations = data_relations(cur, p["schema"], p["tables"])

        def gone():
            try:
                return watch.gone(cur)
            except Exception:  # noqa: BLE001 - a lost watch connection means nothing about the play
                return os.getppid() != watch.parent

        out = {"path": self.final, "format": p["format"], "removed_partials": leftovers, "set_aside": None,
               "table_writes": writes, "stats_reset": reset}
        if module.check_mode:
            conn.close()
            parts = ["would dump database %s (%d bytes, without schema %s) to %s (%s format), read it back whole "
                     "and check the data of %s" % (p["login_db"] or "(PGDATABASE)", size, p["exclude_schema"],
                                                   self.final, p["format"], ", ".join(p["tables"]) or "no table")]
            if leftovers:
                parts.append("would remove the partial dumps of killed runs: %s" % ", ".join(leftovers))
            if exists:
                parts.append("would set aside %s (not a recorded dump) as %s%s<stamp>"
                             % (self.final, self.final, UNVERIFIED))
            return dict(out, changed=True, msg="; ".join(parts))
        directory = os.path.dirname(self.final)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)  # another region's dump may make it meanwhile
        for leftover in leftovers:
            remove(leftover)
        if leftovers:
            module.warn("removed the partial dump(s) of a killed run: %s" % ", ".join(leftovers))
        if exists:
            out["set_aside"] = set_aside(self.final, stamp)
            module.warn("%s was there already but no verified dump is recorded for it: moved aside to %s (not "
                        "used as the backup; remove it once you know what it is)" % (self.final, out["set_aside"]))
        tmp = "%s%s%s-%d" % (self.final, PARTIAL, stamp, os.getpid())
        argv = [p["pg_dump"], "--format=" + p["format"], "--compress=%d" % p["compress"], "--file=" + tmp,
                "--exclude-schema=" + p["exclude_schema"]] + connection_args(p)
        if p["format"] == "directory":
            argv.append("--jobs=%d" % p["jobs"])
        try:
            res = run(argv, env=child_env(p), gone=gone)
            if res.returncode != 0:
                what = "pg_dump of %s into %s" % (p["login_db"] or "(PGDATABASE)", tmp)
                raise DedupPgError(describe_failure(what, res.stderr, p["login_password"]))
            entries = verify(p["pg_restore"], tmp, p["schema"], p["tables"], gone=gone, relations=relations)
            seal(tmp)
            publish(tmp, self.final)
        except BaseException:
            remove(tmp)
            raise
        finally:
            conn.close()
        out["bytes"], out["sha256"] = measure(self.final)
        out["verified_entries"] = entries
        out["argv"] = argv
        return dict(out, changed=True, msg="dumped %s to %s (%d bytes), read back whole, %d entries" % (
            p["login_db"], self.final, out["bytes"], entries))


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        action=dict(type="str", default="dump", choices=["dump", "check"]),
        path=dict(type="path", required=True),
        format=dict(type="str", default="custom", choices=["custom", "directory"]),
        jobs=dict(type="int", default=2),
        compress=dict(type="int", default=5),
        pg_dump=dict(type="str", default="pg_dump"),
        pg_restore=dict(type="str", default="pg_restore"),
        schema=dict(type="str", required=True),
        tables=dict(type="list", elements="str", default=[]),
        exclude_schema=dict(type="str", default="dedup_rollout"),
        sha256=dict(type="str"),
        table_writes=dict(type="dict"),
        stats_reset=dict(type="str"),
        compare_tables=dict(type="list", elements="str", default=[]),
        run_lock_id=dict(type="str", default=""),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    validate_identifier(p["schema"], "schema", module)
    validate_identifier(p["exclude_schema"], "schema", module)
    for t in p["tables"] + p["compare_tables"]:
        validate_identifier(t, "table", module)
    job = DumpBackup(module)
    try:
        out = job.check() if p["action"] == "check" else job.dump()
    except DedupPgError as exc:
        module.fail_json(msg=str(exc), path=job.final)
    except OSError as exc:
        module.fail_json(msg="the dump at %s failed: %s" % (job.final, exc), path=job.final)
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="pg_dump_backup failed: %s" % error_text(exc, module), path=job.final,
                         exception=traceback.format_exc())
    module.exit_json(**out)


if __name__ == "__main__":
    main()
