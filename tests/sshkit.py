"""sshkit: the rollout as production runs it, over SSH with become, on this machine (issue 16).

Fixtures
--------
``ssh_topology`` (session)
    An ``sshd`` of our own (``/usr/sbin/sshd -D -f <its config> -p <free port>``, listening on 127.0.0.2 and
    127.0.0.3 only, its own ed25519 host key, no PAM, ``PermitRootLogin no``, public keys only) and a throwaway
    unprivileged OS user ``dsh<random>`` with a generated ed25519 key and passwordless sudo (a file in
    /etc/sudoers.d checked with ``visudo -cf``). Everything goes at teardown.

``ssh_lab`` (function)
    The ``lab`` fixture (database clone, ETL user, crontab, releases) reached over that SSH topology: the same
    :class:`labkit.Lab` with ``inventory`` replaced by one built by :func:`write_ssh_inventory` from
    ``inventory/production`` itself (its hosts.yml shape and its group_vars, with only host names, the connection
    endpoint, secrets and the lab's paths replaced), so the shipped inventories and the tested one cannot drift.

Needs root, openssh-server, sudo and acl (``scripts/bootstrap.sh`` installs them); skips otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness import REPO, free_port, wait_for

SSHD = "/usr/sbin/sshd"
PRODUCTION = REPO / "inventory" / "production"
# The two machines of one region, as loopback addresses (all of 127/8 is on lo on Linux).
HOSTS = {"db": ("ssh-db", "127.0.0.2"), "etl": ("ssh-etl", "127.0.0.3")}
# The targets' python: the system one, with python3-psycopg2 (scripts/bootstrap.sh) for the db host's modules.
TARGET_PYTHON = "/usr/bin/python3"
SSH_COMMON_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"


@dataclass
class SshTopology:
    root: Path
    user: str
    key: Path
    port: int
    sshd: subprocess.Popen
    hosts: dict[str, tuple[str, str]]

    def ssh(self, address: str, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """``ssh <user>@<address> COMMAND`` with the topology's key (no ControlMaster)."""
        return subprocess.run(
            ["ssh", "-p", str(self.port), "-i", str(self.key), *SSH_COMMON_ARGS.split(), "-o", "BatchMode=yes",
             f"{self.user}@{address}", *command], capture_output=True, text=True, timeout=timeout)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def _sshd_config(root: Path, port: int, user: str) -> Path:
    conf = root / "sshd_config"
    conf.write_text("\n".join([
        f"Port {port}",
        *(f"ListenAddress {addr}" for _, addr in HOSTS.values()),
        f"HostKey {root / 'ssh_host_ed25519_key'}",
        f"PidFile {root / 'sshd.pid'}",
        "UsePAM no",
        "PermitRootLogin no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        # The keys live in this root-owned temp dir, below the world-writable /tmp: StrictModes would refuse them.
        f"AuthorizedKeysFile {root / 'authorized_keys'}/%u",
        "StrictModes no",
        f"AllowUsers {user}",
        "Subsystem sftp internal-sftp",
        # A controller that vanished without closing its connection is noticed within 15 s.
        "ClientAliveInterval 5",
        "ClientAliveCountMax 3",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "LogLevel VERBOSE",
        "",
    ]))
    return conf


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("sshkit needs root: it creates an OS user with sudo and starts an sshd")
    missing = [p for p in (SSHD, shutil.which("sudo"), shutil.which("visudo"), shutil.which("setfacl"),
                           shutil.which("ssh")) if not p or not os.access(p, os.X_OK)]
    if missing or not os.access(SSHD, os.X_OK):
        pytest.skip("sshkit needs openssh-server, sudo and acl: run scripts/bootstrap.sh as root")


def _reachable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((address, port)) == 0


def _stop_user_processes(user: str) -> None:
    """SIGKILL every process of the throwaway user (sshd sessions, a lock holder it left), one pid at a time."""
    out = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="session")
def ssh_topology():
    _require()
    root = Path(tempfile.mkdtemp(prefix="dedup-sshkit-"))
    os.chmod(root, 0o755)
    user = "dsh" + uuid.uuid4().hex[:8]
    sudoers = Path("/etc/sudoers.d") / f"dedup-sshkit-{user}"
    sshd = None
    try:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshkit host", "-f",
              str(root / "ssh_host_ed25519_key")])
        key = root / "id_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sshkit {user}", "-f", str(key)])
        # A home of its own (ansible's remote tmp for copy/template), '*' as password: no password, not locked
        # (sshd without PAM refuses a '!' locked account even for a public key).
        _run(["useradd", "--create-home", "--home-dir", str(root / "home"), "--shell", "/bin/sh", user])
        _run(["usermod", "-p", "*", user])
        (root / "authorized_keys").mkdir(mode=0o755)
        (root / "authorized_keys" / user).write_text((root / "id_ed25519.pub").read_text())
        os.chmod(root / "authorized_keys" / user, 0o644)
        # Passwordless sudo, checked by visudo before it goes live.
        staged = root / "sudoers"
        staged.write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(staged, 0o440)
        _run(["visudo", "-cf", str(staged)])
        shutil.copy2(staged, sudoers)
        os.chmod(sudoers, 0o440)
        _run(["visudo", "-c"])
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for attempt in range(3):
            port = free_port()
            conf = _sshd_config(root, port, user)
            _run([SSHD, "-t", "-f", str(conf)])
            log = open(root / "sshd.log", "a")
            sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf), "-p", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            try:
                wait_for(lambda proc=sshd, port=port: proc.poll() is not None or all(
                    _reachable(addr, port) for _, addr in HOSTS.values()), timeout=15, interval=0.1)
            except TimeoutError:
                pass
            if sshd.poll() is None and all(_reachable(addr, port) for _, addr in HOSTS.values()):
                break
            if sshd.poll() is None:
                sshd.kill()
            sshd.wait(timeout=10)
            if attempt == 2:
                raise RuntimeError("sshkit: sshd did not start:\n" + (root / "sshd.log").read_text()[-3000:])
        topo = SshTopology(root=root, user=user, key=key, port=port, sshd=sshd, hosts=dict(HOSTS))
        for _, addr in HOSTS.values():
            res = topo.ssh(addr, "sudo", "-n", "id", "-un")
            assert res.returncode == 0 and res.stdout.strip() == "root", (
                f"sshkit: {user}@{addr}:{port} with sudo does not work: {res.stdout}{res.stderr}\n"
                + (root / "sshd.log").read_text()[-3000:])
        yield topo
    finally:
        if sshd is not None and sshd.poll() is None:
            sshd.terminate()
            try:
                sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            sudoers.unlink()
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            _stop_user_processes(user)
            subprocess.run(["userdel", "--force", "--remove", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the inventory


def production_shape() -> dict:
    """inventory/production/hosts.yml as {region: {'db': host, 'etl': host}} (asserting its shape)."""
    hosts = yaml.safe_load((PRODUCTION / "hosts.yml").read_text())
    children = hosts["all"]["children"]
    db, etl = set(children["db"]["hosts"]), set(children["etl"]["hosts"])
    regions = {}
    for group, body in children.items():
        if group in ("db", "etl"):
            continue
        members = set(body["hosts"])
        assert len(members & db) == 1 and len(members & etl) == 1 and members <= db | etl, (
            f"region {group} of inventory/production must hold one db and one etl host: {sorted(members)}")
        regions[group] = {"db": (members & db).pop(), "etl": (members & etl).pop()}
    assert regions and set().union(*({r["db"], r["etl"]} for r in regions.values())) == db | etl
    return regions


def write_ssh_inventory(path: Path, lab, topo: SshTopology) -> Path:
    """inventory/production with its first region mapped onto ssh-db/ssh-etl of ``topo`` and the lab's database.

    Kept as shipped: the group layout (db, etl, region groups), every group_vars file (ansible_become, the
    python, ssh args, dedup_* settings, the region's smoke commands). Replaced: host names, the connection
    endpoint (ansible_host/port/user/key), the secret (vault.yml) and where the lab lives (port, database name,
    ETL user and directory, backup and report directories)."""
    region, members = next(iter(production_shape().items()))
    names = {members[kind]: HOSTS[kind][0] for kind in ("db", "etl")}
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(PRODUCTION / "group_vars", path / "group_vars",
                    ignore=shutil.ignore_patterns("*.example", "vault.yml"))
    hosts = {"all": {"children": {
        "db": {"hosts": {names[members["db"]]: {"ansible_host": HOSTS["db"][1]}}},
        "etl": {"hosts": {names[members["etl"]]: {"ansible_host": HOSTS["etl"][1]}}},
        region: {"hosts": {names[members["db"]]: None, names[members["etl"]]: None}},
    }}}
    (path / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    secret = path / "group_vars" / "all" / "vault.yml"
    secret.touch(mode=0o600)
    secret.write_text(yaml.safe_dump({"vault_dedup_db_password": lab.password}))
    lab_vars = {
        "ansible_user": topo.user,
        "ansible_port": topo.port,
        "ansible_ssh_private_key_file": str(topo.key),
        "ansible_ssh_common_args": SSH_COMMON_ARGS,
        "dedup_db_port": lab.pg.port,
        "dedup_db_name": lab.dbname,
        "dedup_backup_dir": str(lab.backup_dir),
        "dedup_report_root": str(lab.root / "reports"),
        "dedup_etl_user": lab.etl_user,
        "dedup_etl_dir": str(lab.etl_dir),
        # The scheduled check writes system paths (/etc/cron.d ...): off in tests, as in labkit.
        "monitor_schedule": False,
    }
    (path / "group_vars" / "all" / "zz_sshkit.yml").write_text(yaml.safe_dump(lab_vars, sort_keys=False))
    return path


@pytest.fixture
def ssh_lab(lab, ssh_topology):
    """The lab, reached over SSH as an unprivileged user with sudo (a copy of ``lab`` with the SSH inventory)."""
    inv = write_ssh_inventory(lab.root / "sshinv", lab, ssh_topology)
    return dataclasses.replace(lab, inventory=inv)


def holder_gone_within(lab, seconds: float) -> float | None:
    """Seconds until no session of this lab's database is a pg_run_lock holder, None after ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        n = lab.query("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND application_name LIKE 'dedup-rollout/lock%%'")[0][0]
        if n == 0:
            return time.monotonic() - start
        time.sleep(0.25)
    return None
