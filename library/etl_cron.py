#!/usr/bin/python
"""Ansible module etl_cron: pause and resume cron jobs by regex, byte-exact, with a recognisable marker."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: etl_cron
short_description: Pause and resume matching cron jobs (user crontab or /etc/cron.d file), byte-exact
description:
  - C(state=paused) prefixes every active (not commented) cron line whose command matches C(pattern)
    with C(marker). Lines already paused are left as they are (never a double marker); lines a person
    commented out, environment lines (C(MAILTO=), C(PATH=)), blank lines, comments and unrelated jobs stay
    byte-identical, and so does the presence or absence of a final newline.
  - C(state=active) removes exactly the marker from marked lines whose job matches C(pattern), nothing else.
    Nothing paused means C(changed=false).
  - C(state=status) only reads.
  - Works on a user's crontab through the real C(crontab) command, or on a file such as C(/etc/cron.d/etl)
    (system format with a user field), which is rewritten atomically keeping its mode and owner.
  - With C(process_pattern), also reports running processes whose command line matches (from C(/proc)),
    so a play can wait for a running ETL to finish.
version_added: "1.0.0"
author: dedup-rollout
options:
  user:
    description: Whose crontab (default the user the module runs as). Mutually exclusive with C(cron_file).
    type: str
  cron_file:
    description: Path of a system cron file (for example C(/etc/cron.d/etl)) instead of a user crontab.
    type: path
  pattern:
    description: Python regex searched in each job's command text. Required for C(paused) and C(active).
    type: str
  state:
    description: What to do.
    type: str
    choices: [paused, active, status]
    default: status
  marker:
    description: The prefix that marks a paused line. Must start with C(#).
    type: str
    default: "#dedup-paused# "
  process_pattern:
    description:
      - Python regex searched in the command line of every process; matches are returned in C(running).
      - The module's own process and its ancestors (the ansible processes running it, and forks of them with
        the same command line) are excluded; filtered to C(user) when C(user) is given.
    type: str
notes:
  - Supports check mode (writes nothing) and diff mode.
"""

EXAMPLES = r"""
- name: Pause the ETL cron jobs
  etl_cron:
    user: breezeway
    pattern: 'run_etl\.py'
    state: paused
    process_pattern: 'run_etl\.py'
  register: etl_cron_paused

- name: Resume them
  etl_cron:
    user: breezeway
    pattern: 'run_etl\.py'
    state: active

- name: Pause jobs in a system cron file
  etl_cron:
    cron_file: /etc/cron.d/breezeway-etl
    pattern: 'run_etl\.py'
    state: paused
"""

RETURN = r"""


lines:
  description: The lines touched, as they are after the change (would be, in check mode).
  returned: always
  type: list
  elements: str
paused_lines:
  description: Lines carrying the marker (after the change).
  returned: always
  type: list
  elements: str
active_lines:
  description: Active (not commented) job lines matching C(pattern) (after the change).
  returned: always
  type: list
  elements: str
running:
  description: Processes matching C(process_pattern), each with pid, user, cmdline.
  returned: when process_pattern is given
  type: list
  elements: dict
target:
  description: C(crontab of USER) or the cron file path.
  returned: always
  type: str
exists:
  description: Whether the crontab or cron file existed before the change.
  returned: always
  type: bool
"""

import os
import pwd
import re
import subprocess
import tempfile

from ansible.module_utils.basic import AnsibleModule

ENV_RE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
USER_JOB_RE = re.compile(r"^\s*(?:@\w+|\S+\s+\S+\s+\S+\s+\S+\s+\S+)\s+(?P<cmd>.*)$")
SYSTEM_JOB_RE = re.compile(r"^\s*(?:@\w+|\S+\s+\S+\s+\S+\s+\S+\s+\S+)\s+\S+\s+(?P<cmd>.*)$")


def decode(data):
    return data.decode("utf-8", "surrogateescape")


def encode(text):
    return text.encode("utf-8", "surrogateescape")


def job_command(line, system):
    """The command text of a cron job line, or None for blank/comment/env lines."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ENV_RE.match(line):
        return None
    m = (SYSTEM_JOB_RE if system else USER_JOB_RE).match(line.rstrip("\r"))
    return m.group("cmd") if m else None


def transform(text, state, pattern, marker, system):
    """Return (new_text, touched_lines). Works line by line on '\\n'-split text; joins back exactly."""
    lines = text.split("\n")
    touched = []
    for i, line in enumerate(lines):
        if state == "paused":
            if line.startswith(marker):
                continue
            cmd = job_command(line, system)
            if cmd is not None and pattern.search(cmd):
                lines[i] = marker + line
                touched.append(lines[i])
        elif state == "active":
            if not line.startswith(marker):
                continue
            inner = line[len(marker):]
            cmd = job_command(inner, system)
            if cmd is not None and pattern.search(cmd):
                lines[i] = inner
                touched.append(inner)
    return "\n".join(lines), touched


def summarise(text, pattern, marker, system):
    paused, active = [], []
    for line in text.split("\n"):
        if line.startswith(marker):
            paused.append(line)
            continue
        cmd = job_command(line, system)
        if cmd is not None and pattern is not None and pattern.search(cmd):
            active.append(line)
    return paused, active


class CrontabTarget:
    def __init__(self, module, user):
        self.module = module
        self.user = user
        self.me = pwd.getpwuid(os.geteuid()).pw_name
        self.label = f"crontab of {user}"

    def _user_args(self):
        return ["-u", self.user] if (os.geteuid() == 0 or self.user != self.me) else []

    def read(self):
        crontab = self.module.get_bin_path("crontab", required=True)
        proc = subprocess.run([crontab, *self._user_args(), "-l"], capture_output=True)
        if proc.returncode != 0:
            err = decode(proc.stderr)
            if "no crontab for" in err:
                return b"", False
            self.module.fail_json(msg=f"crontab -l for user {self.user} failed (rc={proc.returncode}): {err.strip()}")
        return proc.stdout, True

    def write(self, data):
        crontab = self.module.get_bin_path("crontab", required=True)
        fd, path = tempfile.mkstemp(prefix="etl_cron.", suffix=".crontab")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            proc = subprocess.run([crontab, *self._user_args(), path], capture_output=True)
            if proc.returncode != 0:
                err = decode(proc.stderr).strip()
                self.module.fail_json(msg=f"installing the crontab of {self.user} failed (rc={proc.returncode}): {err}")
        finally:
            if os.path.exists(path):
                os.unlink(path)


class FileTarget:
    def __init__(self, module, path):
        self.module = module
        self.path = path
        self.label = path

    def read(self):
        try:
            with open(self.path, "rb") as fh:
                return fh.read(), True
        except FileNotFoundError:
            return b"", False
        except OSError as exc:
            self.module.fail_json(msg=f"cannot read cron file {self.path}: {exc}")

    def write(self, data):
        st = os.stat(self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".etl_cron.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), st.st_mode & 0o7777)
                if os.geteuid() == 0:
                    os.fchown(fh.fileno(), st.st_uid, st.st_gid)
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            self.module.fail_json(msg=f"cannot write cron file {self.path}: {exc}")


def own_tree():
    """This process and its ancestors (ansible's worker, ansible-playbook...), never reported as 'running'.

    Also returns their command lines: forked siblings of ansible's workers carry the same argv.
    """
    pids = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/status") as fh:
                ppid = next(int(line.split()[1]) for line in fh if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            break
        pids.add(ppid)
        pid = ppid
    cmdlines = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw:
            cmdlines.add(raw)
    return pids, cmdlines


def running_processes(regex, user=None):
    exclude, own_cmdlines = own_tree()
    uid = pwd.getpwnam(user).pw_uid if user else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                raw = fh.read()
            owner = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if not raw or raw in own_cmdlines:
            continue
        cmdline = decode(raw.rstrip(b"\0").replace(b"\0", b" "))
        if uid is not None and owner != uid:
            continue
        if regex.search(cmdline):
            try:
                name = pwd.getpwuid(owner).pw_name
            except KeyError:
                name = str(owner)
            found.append({"pid": int(entry), "user": name, "cmdline": cmdline})
    return sorted(found, key=lambda p: p["pid"])


def compile_regex(module, text, what):
    try:
        return re.compile(text)
    except re.error as exc:
        module.fail_json(msg=f"{what} {text!r} is not a valid regular expression: {exc}")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            user=dict(type="str"),
            cron_file=dict(type="path"),
            pattern=dict(type="str"),
            state=dict(type="str", choices=["paused", "active", "status"], default="status"),
            marker=dict(type="str", default="#dedup-paused# "),
            process_pattern=dict(type="str"),
        ),
        mutually_exclusive=[["user", "cron_file"]],
        required_if=[["state", "paused", ["pattern"]], ["state", "active", ["pattern"]]],
        supports_check_mode=True,
    )
    p = module.params
    state = p["state"]
    marker = p["marker"]
    if not marker or not marker.startswith("#") or "\n" in marker or "\r" in marker:
        module.fail_json(msg=f"marker must be a single-line comment prefix starting with '#' (got {marker!r})")
    pattern = compile_regex(module, p["pattern"], "pattern") if p["pattern"] else None
    if p["user"]:
        try:
            pwd.getpwnam(p["user"])
        except KeyError:
            module.fail_json(msg="user {} does not exist on this host".format(p["user"]))

    if p["cron_file"]:
        target = FileTarget(module, p["cron_file"])
        system = True
    else:
        target = CrontabTarget(module, p["user"] or pwd.getpwuid(os.geteuid()).pw_name)
        system = False

    before_bytes, exists = target.read()
    before = decode(before_bytes)
    after, touched = before, []
    if state in ("paused", "active"):
        after, touched = transform(before, state, pattern, marker, system)
    changed = after != before
    if changed and not module.check_mode:
        target.write(encode(after))
    paused, active = summarise(after, pattern, marker, system)
    result = dict(changed=changed, lines=touched, paused_lines=paused, active_lines=active,
                  target=target.label, exists=exists)
    if module._diff:
        result["diff"] = {"before": before, "after": after,
                          "before_header": target.label, "after_header": target.label}
    if p["process_pattern"]:
        regex = compile_regex(module, p["process_pattern"], "process_pattern")
        result["running"] = running_processes(regex, p["user"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
