#!/usr/bin/python
"""Hold a session-level advisory lock for the whole run, so that two deploys never run at once."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_run_lock
short_description: Hold the dedup-rollout advisory lock for the duration of a play
description:
  - C(state=held) starts a small detached holder process on the target that connects to the database and
    takes C(pg_try_advisory_lock) on a key derived from C(name). If another session holds it, the module
    fails at once naming that session (application name, pid, since when).
  - The holder keeps the lock until C(state=released), until the play that started it is gone, or until
    C(max_seconds). "The play" is the C(ansible-playbook) process that started the module when the play runs
    on the same machine (connection local), else the C(sshd) process of the SSH connection the module came
    through (the session's C(sshd) child, shared by the tasks of a multiplexed ControlMaster connection) - a
    killed controller, a lost connection (sshd C(ClientAliveInterval)) or the end of the ControlPersist time
    after the last task ends it. Its start time is checked too, so a reused pid does not count.
  - Because an advisory lock lives with its session, a crashed holder never leaves a stale lock behind.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  state:
    description: held or released.
    type: str
    default: held
    choices: [held, released]
  name:
    description: Lock name (hashed to the advisory lock key).
    type: str
    default: dedup-rollout
  run_id:
    description: Shown to whoever is refused.
    type: str
    default: ''
  state_dir:
    description:
      - Directory (owner-only) where the holder keeps its pid file, one per lock name, server (host, port) and
        database, which C(state=released) reads to stop that holder and no other.
    type: path
    default: ~/.cache/dedup-rollout
  max_seconds:
    description: Longest the holder keeps the lock.
    type: int
    default: 43200
"""

EXAMPLES = r"""
- name: Take the deploy lock
  pg_run_lock:
    state: held
    run_id: "{{ dedup_run_id }}"
    login_db: breezeway
"""

RETURN = r"""
holder_pid:
  description: Pid of the holder process.
  returned: state=held
  type: int
watching_pid:
  description: Pid of the process whose end releases the lock (see C(description)), or null.
  returned: state=held
  type: int
lock_key:
  description: The advisory lock key (bigint) derived from C(name) and the database name.
  returned: state=held
  type: int
watching:
  description: What the holder watches (kind ansible-playbook or sshd, pid, command line); null when nothing was found.
  returned: state=held
  type: dict
"""

import hashlib
import json
import os
import signal
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_pg import (
    conn_params,
    describe_connect_error,
    pg_common_argument_spec,
    run_lock_app_name,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover
    psycopg2 = None


def lock_key(name, dbname):
    return int.from_bytes(hashlib.sha256(("%s/%s" % (name, dbname)).encode()).digest()[:8], "big", signed=True)


def pidfile_name(name, kw, dbname):
    """The holder's pid file: one per lock AND server. The advisory lock is per database already, but several
    regions' databases of the same name on different servers may be locked from one machine (db hosts that
    reach their servers through login_host): a release must never stop another server's holder."""
    where = "%s/%s/%s/%s" % (name, kw.get("host") or "", kw.get("port") or "", dbname)
    return "lock-%s.pid" % hashlib.sha256(where.encode()).hexdigest()[:16]


def proc_info(pid):
    """(parent pid, start time in clock ticks, comm, command line) of ``pid``, None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            head, rest = fh.read().rsplit(")", 1)
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return None
    fields = rest.split()
    return int(fields[1]), int(fields[19]), head.split("(", 1)[1], cmd


def play_anchor():
    """The process whose life is the play's, as seen from this module: the top-most ansible-playbook ancestor
    (the play runs on this machine), else the nearest sshd ancestor (the SSH connection the module came through:
    sudo/su and the shells between are skipped). A dict kind/pid/start/cmd, or None (another connection type)."""
    pid, found = os.getppid(), None
    for _ in range(40):
        if pid <= 1:
            break
        info = proc_info(pid)
        if info is None:
            break
        ppid, start, comm, cmd = info
        if "ansible-playbook" in cmd or "ansible " in cmd:
            found = {"kind": "ansible-playbook", "pid": pid, "start": start, "cmd": cmd[:200]}
        elif comm in ("sshd", "sshd-session"):
            # The SSH connection: what is above it is this machine's own process tree, not the play.
            return found or {"kind": "sshd", "pid": pid, "start": start, "cmd": cmd[:200]}
        pid = ppid
    return found


def alive(pid):
    """Whether ``pid`` runs. A zombie does not: the holder is detached (double fork), so its exit is reaped by
    whatever init the host has, possibly late, and the lock went with its connection already."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: as before


def anchor_alive(anchor):
    """Whether the watched process still runs (same pid AND same start time: a reused pid does not count)."""
    info = proc_info(anchor["pid"])
    return info is not None and info[1] == anchor["start"]


class Released(Exception):
    """SIGTERM from state=released: stop holding the lock."""


def holder(kw, key, run_id, watch, max_seconds, pidfile, wfd):
    """Runs in the detached child: take the lock, report, keep it while allowed."""
    try:
        conn = psycopg2.connect(**kw)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        if not cur.fetchone()[0]:
            cur.execute(
                "SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start::text FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objid = (%s::bigint & 4294967295)::oid AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())",
                (key,),
            )
            rows = cur.fetchall()
            os.write(wfd, json.dumps({"ok": False, "holders": rows}).encode())
            return 1
        with open(pidfile, "w") as fh:
            fh.write("%d\n" % os.getpid())
        os.write(wfd, json.dumps({"ok": True, "pid": os.getpid()}).encode())
        os.close(wfd)
        deadline = time.time() + max_seconds

        def released(*_args):
            raise Released()

        # state=released sends SIGTERM: leave the one-second wait at once (a flag set by the handler was only seen
        # after the sleep and the next look-up, which made every release cost 1-2.5 s).
        signal.signal(signal.SIGTERM, released)
        try:
            while time.time() < deadline and (watch is None or anchor_alive(watch)):
                time.sleep(1)
                cur.execute("SELECT 1")
        except Released:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:  # released before this process ends, so whoever waits for its end may take the lock at once
            cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg2.Error:
            pass  # the connection is gone: so is the lock
        conn.close()
        return 0
    except Exception as exc:  # noqa: BLE001
        try:
            os.write(wfd, json.dumps({"ok": False, "error": describe_connect_error(exc, kw)}).encode())
        except OSError:
            pass
        return 1
    finally:
        try:
            if os.path.exists(pidfile) and open(pidfile).read().strip() == str(os.getpid()):
                os.unlink(pidfile)
        except OSError:
            pass


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        state=dict(type="str", default="held", choices=["held", "released"]),
        name=dict(type="str", default="dedup-rollout"),
        run_id=dict(type="str", default=""),
        state_dir=dict(type="path", default="~/.cache/dedup-rollout"),
        max_seconds=dict(type="int", default=43200),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    kw = conn_params(p)
    dbname = kw.get("dbname") or os.environ.get("PGDATABASE", "")
    key = lock_key(p["name"], dbname)
    state_dir = os.path.expanduser(p["state_dir"])
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    pidfile = os.path.join(state_dir, pidfile_name(p["name"], kw, dbname))
    if p["state"] == "released":
        try:
            pid = int(open(pidfile).read().strip())
        except (OSError, ValueError):
            module.exit_json(changed=False, msg="no lock held from this host")
        if module.check_mode:
            module.exit_json(changed=True, msg="would release the lock (holder pid %d)" % pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(50):
            if not alive(pid):
                break
            time.sleep(0.1)
        module.exit_json(changed=True, msg="lock released (holder pid %d)" % pid)
    if psycopg2 is None:
        module.fail_json(msg="the python psycopg2 library is required on the target")
    kw["application_name"] = run_lock_app_name(p["run_id"])
    watch = play_anchor()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: detach completely, then hold the lock
        os.close(rfd)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os._exit(holder(kw, key, p["run_id"], watch, p["max_seconds"], pidfile, wfd))
    os.close(wfd)
    os.waitpid(pid, 0)
    data = b""
    deadline = time.time() + max(30, p["connect_timeout"] + 10)
    while time.time() < deadline:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    try:
        res = json.loads(data.decode() or "{}")
    except ValueError:
        res = {}
    if res.get("ok"):
        # In check mode the lock is still taken: it changes nothing and keeps a real run out meanwhile.
        module.exit_json(changed=False, holder_pid=res["pid"], watching=watch, lock_key=key,
                         watching_pid=watch["pid"] if watch else None,
                         msg="deploy lock held by pid %d until %s" % (
                             res["pid"], "%s pid %d is gone" % (watch["kind"], watch["pid"]) if watch
                             else "released or %d s passed" % p["max_seconds"]))
    if res.get("holders") is not None:
        who = "; ".join("pid %s (%s%s, connected since %s)" % (r[0], r[1], " from " + r[2] if r[2] else "", r[3])
                        for r in res["holders"]) or "an unknown session"
        module.fail_json(msg="another dedup-rollout run holds the lock on database %s: %s. Wait for it to finish; "
                             "two deploys must never run at once." % (dbname, who))
    module.fail_json(msg="could not take the deploy lock: %s" % res.get("error", "the holder did not answer"))


if __name__ == "__main__":
    main()
