#!/usr/bin/python
"""Ansible module dedup_check_files: the scheduled check's files on the db host, in one run."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: dedup_check_files
short_description: Install, refresh or remove the scheduled check's files (script, config, pgpass, cron file)
description:
  - What roles/monitor/tasks/schedule.yml needs on the db host, in one module run instead of one per file.
  - C(state=present), in this order. When C(cron_dir) exists but is not a directory, nothing is written and
    C(cron_dir.isdir) is false (the role refuses with its own message). Each of C(directories) is created
    (with its missing parents) or given its mode; C(cron_dir) is created C(0755) when missing. C(script),
    C(pgpass) and C(config) are written only when their content differs, through a temporary file in the same
    directory, created C(0600), given its mode and owner, then renamed over the file (atomic; a reader never
    sees half a file, the password never sits in a file others can read); a file whose content is right only
    gets its mode or owner fixed. Then the cron file is kept in step with the period by the script's own code
    (C(schedule) of scripts/dedup_check.py, run in this process from C(script.content)) - hourly, then daily,
    or no file and the check retired once the period is over.
  - C(state=absent) removes each of C(remove) that exists.
  - C(changed) only when something changed on disk (in check mode, would change); C(changes) says what.
  - Check mode writes nothing; the cron file is compared with what the new config and script would write.
version_added: "1.0.0"
author: dedup-rollout
options:
  state:
    description: C(present) installs or refreshes the check, C(absent) removes the files named in C(remove).
    type: str
    choices: [present, absent]
    default: present
  directories:
    description: Directories the check needs (state=present), each created or given its mode.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The directory.
        type: path
        required: true
      mode:
        description: Its mode, octal text such as C("0755"); also given to the missing parents it creates.
        type: str
        required: true
  cron_dir:
    description:
      - cron's drop-in directory holding the check's cron file (state=present). Must be a directory when it
        exists; created C(0755) when missing.
    type: path
  script:
    description: scripts/dedup_check.py (state=present), written as given; also the code that writes the cron file.
    type: dict
    suboptions:
      path:
        description: Where the file goes.
        type: path
        required: true
      content:
        description: The whole content of the file.
        type: str
        required: true
      mode:
        description: Its mode, octal text such as C("0600").
        type: str
        required: true
      owner:
        description: Its owner (a user name); unset keeps the owner of an existing file (a new one gets the module's).
        type: str
  config:
    description:
      - The check's JSON configuration (state=present). Its C(cron_file), C(config_path), period and C(command)
        decide the cron file.
    type: dict
    suboptions:
      path:
        description: Where the file goes.
        type: path
        required: true
      content:
        description: The whole content of the file.
        type: str
        required: true
      mode:
        description: Its mode, octal text such as C("0600").
        type: str
        required: true
      owner:
        description: Its owner (a user name); unset keeps the owner of an existing file (a new one gets the module's).
        type: str
  pgpass:
    description:
      - The check's pgpass file (state=present). C(content) carries the password; it is never returned or logged
        by the module (no_log), and the task should be no_log too.
    type: dict
    suboptions:
      path:
        description: Where the file goes.
        type: path
        required: true
      content:
        description: The pgpass line(s).
        type: str
        required: true
      mode:
        description: Its mode, octal text such as C("0600").
        type: str
        required: true
      owner:
        description: Its owner (a user name); unset keeps the owner of an existing file (a new one gets the module's).
        type: str
  now:
    description:
      - ISO 8601 time used as now for the period (state=present); empty uses C(DEDUP_NOW) on the host, else its
        clock, like C(dedup_check.py --now).
    type: str
    default: ""
  remove:
    description: Files to remove (state=absent); those already gone are no change.
    type: list
    elements: path
    default: []
notes:
  - Supports check mode. Runs with the privileges of the module's user (root to write C(/etc/cron.d)).
"""

EXAMPLES = r"""
- name: Install or refresh the scheduled check
  dedup_check_files:
    directories:
      - {path: /usr/local/lib/dedup-rollout, mode: "0755"}
      - {path: /etc/dedup-rollout, mode: "0700"}
    cron_dir: /etc/cron.d
    script:
      path: /usr/local/lib/dedup-rollout/dedup_check.py
      content: "{{ lookup('ansible.builtin.file', 'scripts/dedup_check.py', rstrip=false) }}"
      mode: "0755"
    pgpass: {path: /etc/dedup-rollout/check-prod.pgpass, content: "{{ pgpass_line }}\n", mode: "0600", owner: root}
    config: {path: /etc/dedup-rollout/check-prod.json, content: "{{ check_config | to_nice_json }}\n", mode: "0600",
             owner: root}
  no_log: true
  register: installed

- name: Remove it
  dedup_check_files:
    state: absent
    remove: [/etc/cron.d/dedup-check-prod, /etc/dedup-rollout/check-prod.pgpass, /etc/dedup-rollout/check-prod.json]
"""

RETURN = r"""
changes:
  description:
    - One line per change made (in check mode, that would be made), paths only, never content, such as
      "config /etc/dedup-rollout/check-prod.json [content]" or "cron file /etc/cron.d/dedup-check-prod [daily]".
  returned: always
  type: list
  elements: str
cron_dir:
  description: The cron directory as found before anything was done (path, exists, isdir).
  returned: state=present
  type: dict
schedule:
  description:
    - What dedup_check.py C(schedule) says (changed, phase hourly/daily/over, cron_file, installed, hourly_until,
      until, now; removed once the period is over). Null when nothing was installed (cron_dir not a directory).
  returned: state=present
  type: dict
removed:
  description: The files removed (state=absent; in check mode, that would be removed).
  returned: state=absent
  type: list
  elements: str
"""

import json
import os
import pwd
import stat
import tempfile
import traceback

from ansible.module_utils.basic import AnsibleModule

FILE_OPTIONS = dict(
    path=dict(type="path", required=True),
    content=dict(type="str", required=True),
    mode=dict(type="str", required=True),
    owner=dict(type="str"),
)


def parse_mode(module, text, what):
    try:
        mode = int(str(text), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        module.fail_json(msg="%s: mode %r is not an octal mode such as 0600" % (what, text))
    return mode


def user_id(module, owner):
    if not owner:
        return None
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        module.fail_json(msg="user %s does not exist on this host" % owner)


class Files:
    """The changes of one run; ``check`` (check mode) computes them and writes nothing."""

    def __init__(self, module):
        self.module = module
        self.check = module.check_mode
        self.changes = []

    def directory(self, path, mode):
        """Create ``path`` (and its missing parents) with ``mode``, or give an existing one its mode."""
        if os.path.lexists(path) and not os.path.isdir(path):
            self.module.fail_json(msg="%s exists and is not a directory" % path, changes=self.changes)
        missing = []
        cur = os.path.abspath(path)
        while not os.path.isdir(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for d in reversed(missing):
            if not self.check:
                try:
                    os.mkdir(d, 0o700)
                except FileExistsError:
                    # Another region's check on this machine (forks) made it meanwhile.
                    if not os.path.isdir(d):
                        raise
                    continue
                os.chmod(d, mode)
            self.changes.append("directory %s [new, %04o]" % (d, mode))
        if not missing and stat.S_IMODE(os.stat(path).st_mode) != mode:
            self.changes.append("mode of directory %s %04o -> %04o" % (path, stat.S_IMODE(os.stat(path).st_mode), mode))
            if not self.check:
                os.chmod(path, mode)

    def file(self, spec, what):
        """Write ``spec`` (path, content, mode, owner) when it differs; fix only mode/owner when they do."""
        path, data = spec["path"], spec["content"].encode("utf-8")
        mode, uid = parse_mode(self.module, spec["mode"], what), user_id(self.module, spec.get("owner"))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        same = False
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data):
            with open(path, "rb") as fh:
                same = fh.read() == data
        if not same:
            self.changes.append("%s %s [%s]" % (what, path, "content" if st is not None else "new"))
            if not self.check:
                keep = st is not None and stat.S_ISREG(st.st_mode)
                self._write(path, data, mode, uid if uid is not None else (st.st_uid if keep else -1),
                            st.st_gid if keep else -1)
            return
        if stat.S_IMODE(st.st_mode) != mode:
            self.changes.append("mode of %s %s %04o -> %04o" % (what, path, stat.S_IMODE(st.st_mode), mode))
            if not self.check:
                os.chmod(path, mode)
        if uid is not None and st.st_uid != uid:
            self.changes.append("owner of %s %s -> %s" % (what, path, spec["owner"]))
            if not self.check:
                os.chown(path, uid, -1)

    @staticmethod
    def _write(path, data, mode, uid, gid):
        """Atomically: a 0600 temp file in the same directory, mode and owner set, fsync, rename over ``path``."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if uid != -1 or gid != -1:
                    os.fchown(fh.fileno(), uid, gid)
                os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove(self, path):
        if not os.path.lexists(path):
            return False
        self.changes.append("removed %s" % path)
        if not self.check:
            os.unlink(path)
        return True


def load_script(script):
    """scripts/dedup_check.py as a namespace (its functions), from the content being installed."""
    ns = {"__name__": "dedup_check", "__file__": script["path"]}
    exec(compile(script["content"], script["path"], "exec"), ns)  # noqa: S102 - the project's own script
    return ns


def schedule(files, script, config, now_text, cron_dir_missing):
    """dedup_check.py ``schedule`` (``--dry-run`` in check mode) with the config being installed."""
    ns = load_script(script)
    cfg = json.loads(config["content"])
    cfg.setdefault("config_path", os.path.abspath(config["path"]))
    now = ns["now_from"](now_text or None)
    if files.check and cron_dir_missing:
        # The directory would be created first: the file would be written for the phase, if any.
        phase = ns["phase_at"](cfg, now)
        out = {"changed": phase != "over", "phase": phase, "cron_file": cfg["cron_file"], "installed": phase != "over"}
    else:
        try:
            out = ns["sync_cron"](cfg, now, dry_run=files.check)
        except SystemExit as exc:
            files.module.fail_json(msg=str(exc), changes=files.changes)
    _, hourly_until, until = ns["period"](cfg)
    out.update(hourly_until=ns["iso"](hourly_until), until=ns["iso"](until), now=ns["iso"](now))
    if out["changed"]:
        files.changes.append("cron file %s [%s]" % (out["cron_file"], "removed, period over" if out["phase"] == "over"
                                                     else out["phase"]))
    if out["phase"] == "over" and not files.check:
        out["removed"] = ns["retire"](cfg, now)
        out["changed"] = out["changed"] or bool(out["removed"])
        files.changes.extend("%s [removed, period over]" % p for p in out["removed"])
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            directories=dict(type="list", elements="dict", default=[],
                             options=dict(path=dict(type="path", required=True), mode=dict(type="str", required=True))),
            cron_dir=dict(type="path"),
            script=dict(type="dict", options=FILE_OPTIONS),
            config=dict(type="dict", options=FILE_OPTIONS),
            # The dict itself is no secret (paths, mode, owner): only its content is, and that is no_log.
            pgpass=dict(type="dict", no_log=False,
                        options=dict(FILE_OPTIONS, content=dict(type="str", required=True, no_log=True))),
            now=dict(type="str", default=""),
            remove=dict(type="list", elements="path", default=[]),
        ),
        required_if=[("state", "present", ["cron_dir", "script", "config", "pgpass"])],
        supports_check_mode=True,
    )
    p = module.params
    files = Files(module)
    try:
        if p["state"] == "absent":
            removed = [path for path in p["remove"] if files.remove(path)]
            module.exit_json(changed=bool(removed), removed=removed, changes=files.changes,
                             msg="removed %d file(s)" % len(removed))
        cron_dir = {"path": p["cron_dir"], "exists": os.path.lexists(p["cron_dir"]),
                    "isdir": os.path.isdir(p["cron_dir"])}
        if cron_dir["exists"] and not cron_dir["isdir"]:
            module.exit_json(changed=False, cron_dir=cron_dir, schedule=None, changes=[],
                             msg="%s exists but is not a directory: nothing installed" % p["cron_dir"])
        for d in p["directories"]:
            files.directory(d["path"], parse_mode(module, d["mode"], d["path"]))
        if not cron_dir["exists"]:
            files.directory(p["cron_dir"], 0o755)
        files.file(p["script"], "script")
        files.file(p["pgpass"], "pgpass file")
        files.file(p["config"], "config")
        out = schedule(files, p["script"], p["config"], p["now"], not cron_dir["exists"])
    except Exception as exc:  # noqa: BLE001
        module.fail_json(msg="dedup_check_files failed: %s" % exc, changes=files.changes,
                         exception=traceback.format_exc())
    module.exit_json(changed=bool(files.changes), cron_dir=cron_dir, schedule=out, changes=files.changes,
                     msg="; ".join(files.changes) or "nothing to change")


if __name__ == "__main__":
    main()
