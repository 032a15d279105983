"""etl_cron against the real `crontab` command and real files: byte-exact pause/resume, process detection."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time

import pytest

from harness import require_root
from modkit import ansible_doc, run_adhoc, run_module

TEST_USER = "dedup_crontest"
MARK = "#dedup-paused# "

# A hand-written crontab: env lines, comments, blank lines, a human-commented ETL line, unrelated jobs,
# odd spacing and a trailing space; every byte must survive pause + resume.
CRONTAB = (
    b"# m h  dom mon dow   command\n"
    b"MAILTO=ops@example.com\n"
    b"PATH=/usr/local/bin:/usr/bin:/bin\n"
    b"\n"
    b"*/15 * * * * cd /opt/etl && python3 run_etl.py nashville properties >> /var/log/etl.log 2>&1\n"
    b"0  3 * * 1-5\t/opt/etl/venv/bin/python /opt/etl/run_etl.py all --full \n"
    b"# 30 4 * * * python3 /opt/etl/run_etl.py legacy   (disabled by Ann, 2025-10)\n"
    b"@reboot /opt/etl/run_etl.py warmup\n"
    b"5 0 * * * /usr/local/bin/rotate-logs --keep 7\n"
    b"# caf\xc3\xa9 \xe2\x80\x94 comment with non-ASCII\n"
    b"\n"
)


@pytest.fixture(scope="module")
def cron_user():
    require_root("crontab tests use a dedicated test user")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True)
    yield TEST_USER
    subprocess.run(["crontab", "-u", TEST_USER, "-r"], capture_output=True)


def install(user: str, data: bytes | None, tmp_path) -> None:
    if data is None:
        subprocess.run(["crontab", "-u", user, "-r"], capture_output=True)
        return
    f = tmp_path / "install.cron"
    f.write_bytes(data)
    subprocess.run(["crontab", "-u", user, str(f)], check=True)


def listing(user: str) -> bytes:
    proc = subprocess.run(["crontab", "-u", user, "-l"], capture_output=True)
    return proc.stdout if proc.returncode == 0 else b""


def cron(check=False, diff=False, **kw):
    return run_module("etl_cron", kw, check=check, diff=diff)


def test_pause_then_resume_is_byte_identical(cron_user, tmp_path):
    install(cron_user, CRONTAB, tmp_path)
    assert listing(cron_user) == CRONTAB
    res = cron(user=cron_user, pattern=r"run_etl\.py", state="paused")
    assert res["changed"] is True, res
    assert len(res["lines"]) == 3 and all(line.startswith(MARK) for line in res["lines"])
    paused = listing(cron_user)
    lines = paused.split(b"\n")
    assert lines[4].startswith(MARK.encode() + b"*/15 * * * * cd /opt/etl")
    assert lines[5] == MARK.encode() + b"0  3 * * 1-5\t/opt/etl/venv/bin/python /opt/etl/run_etl.py all --full "
    assert lines[6].startswith(b"# 30 4")  # the human comment is untouched
    assert lines[7] == MARK.encode() + b"@reboot /opt/etl/run_etl.py warmup"
    for i in (0, 1, 2, 3, 8, 9, 10):
        assert lines[i] == CRONTAB.split(b"\n")[i]
    assert res["active_lines"] == [] and len(res["paused_lines"]) == 3

    res = cron(user=cron_user, pattern=r"run_etl\.py", state="active")
    assert res["changed"] is True and len(res["lines"]) == 3
    assert listing(cron_user) == CRONTAB
    assert len(res["active_lines"]) == 3 and res["paused_lines"] == []


def test_double_pause_no_double_marker_and_resume_nothing_paused(cron_user, tmp_path):
    install(cron_user, CRONTAB, tmp_path)
    assert cron(user=cron_user, pattern=r"run_etl\.py", state="paused")["changed"] is True
    once = listing(cron_user)
    again = cron(user=cron_user, pattern=r"run_etl\.py", state="paused")
    assert again["changed"] is False and again["lines"] == []
    assert listing(cron_user) == once and MARK.encode() * 2 not in once
    assert cron(user=cron_user, pattern=r"run_etl\.py", state="active")["changed"] is True
    res = cron(user=cron_user, pattern=r"run_etl\.py", state="active")
    assert res["changed"] is False and listing(cron_user) == CRONTAB


def test_active_only_removes_markers_of_matching_lines(cron_user, tmp_path):
    other = b"#dedup-paused# 1 1 * * * /usr/bin/other-job\n"
    install(cron_user, CRONTAB + other, tmp_path)
    cron(user=cron_user, pattern=r"run_etl\.py", state="paused")
    res = cron(user=cron_user, pattern=r"run_etl\.py", state="active")
    assert res["changed"] is True
    assert listing(cron_user) == CRONTAB + other  # the unrelated paused job stays paused


def test_check_mode_and_diff_write_nothing(cron_user, tmp_path):
    install(cron_user, CRONTAB, tmp_path)
    res = cron(check=True, diff=True, user=cron_user, pattern=r"run_etl\.py", state="paused")
    assert res["changed"] is True and len(res["lines"]) == 3
    assert res["diff"]["before"].encode() == CRONTAB and res["diff"]["after"].count(MARK) == 3
    assert listing(cron_user) == CRONTAB


def test_status_and_empty_crontab(cron_user, tmp_path):
    install(cron_user, None, tmp_path)
    res = cron(user=cron_user, pattern=r"run_etl\.py", state="paused")
    assert res["changed"] is False and res["exists"] is False and listing(cron_user) == b""
    install(cron_user, CRONTAB, tmp_path)
    res = cron(user=cron_user, pattern=r"run_etl\.py", state="status")
    assert res["changed"] is False and len(res["active_lines"]) == 3 and res["paused_lines"] == []


def test_cron_file_mode_atomic_keeps_mode_owner_and_missing_final_newline(tmp_path):
    data = (b"SHELL=/bin/sh\n# etl\n*/5 * * * * etl cd /opt/etl && ./run_etl.py a\n"
            b"*/5 * * * * root /usr/bin/run_etl.py-not-this-user-field-match-only\n"
            b"0 1 * * * etl /usr/bin/other")  # no final newline
    f = tmp_path / "breezeway-etl"
    f.write_bytes(data)
    os.chmod(f, 0o640)
    if os.geteuid() == 0:
        os.chown(f, 0, 1)
    st = os.stat(f)
    res = cron(cron_file=str(f), pattern=r"^cd /opt/etl", state="paused")
    assert res["changed"] and res["lines"] == [MARK + "*/5 * * * * etl cd /opt/etl && ./run_etl.py a"]
    new = os.stat(f)
    assert new.st_ino != st.st_ino  # replaced atomically, not rewritten in place
    assert stat.S_IMODE(new.st_mode) == 0o640 and (new.st_uid, new.st_gid) == (st.st_uid, st.st_gid)
    assert not f.read_bytes().endswith(b"\n")
    assert cron(cron_file=str(f), pattern=r"^cd /opt/etl", state="active")["changed"]
    assert f.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["breezeway-etl"]  # no temp files left


def test_bad_input(cron_user, tmp_path):
    res = cron(user="no_such_user_xyz", pattern="x", state="paused")
    assert res["failed"] and "no_such_user_xyz does not exist" in res["msg"]
    res = cron(user=cron_user, cron_file=str(tmp_path / "f"), pattern="x", state="paused")
    assert res["failed"] and "mutually exclusive" in res["msg"]
    res = cron(user=cron_user, state="paused")
    assert res["failed"] and "pattern" in res["msg"]
    res = cron(user=cron_user, pattern="(", state="paused")
    assert res["failed"] and "not a valid regular expression" in res["msg"]
    res = cron(user=cron_user, pattern="x", state="paused", marker="paused ")
    assert res["failed"] and "marker" in res["msg"]


def test_process_detection(cron_user):
    # a real process whose argv matches: sleep, with argv[0] set to an ETL-looking path
    me = subprocess.Popen(["/opt/etl/run_etl.py-probe", "60"], executable="/bin/sleep")
    other = subprocess.Popen(["runuser", "-u", cron_user, "--", "bash", "-c",
                              "exec -a /opt/etl/run_etl.py-probe2 sleep 60"])
    try:
        deadline = time.time() + 5
        while time.time() < deadline:
            res = cron(state="status", process_pattern=r"run_etl\.py-probe")
            # the runuser wrapper (root) matches too before bash execs the sleep as cron_user: wait for both
            if me.pid in {p["pid"] for p in res["running"]} and any(p["user"] == cron_user for p in res["running"]):
                break
            time.sleep(0.1)
        pids = {p["pid"] for p in res["running"]}
        assert me.pid in pids, res["running"]
        mine = next(p for p in res["running"] if p["pid"] == me.pid)
        assert mine["cmdline"] == "/opt/etl/run_etl.py-probe 60" and mine["user"] == "root"
        assert any(p["user"] == cron_user for p in res["running"])
        # filtered to `user` when given
        res = cron(user=cron_user, state="status", process_pattern=r"run_etl\.py-probe")
        assert res["running"] and all(p["user"] == cron_user for p in res["running"])
        # the module's own process tree (whose argv carries the pattern) is never reported
        res = cron(state="status", process_pattern=r"pytest")
        assert all(p["pid"] != os.getpid() for p in res["running"])
    finally:
        me.kill()
        other.kill()
        me.wait()
        other.wait()
    res = cron(state="status", process_pattern=r"run_etl\.py-probe ")
    assert res["running"] == []


def test_through_ansible_cli(cron_user, tmp_path):
    install(cron_user, CRONTAB, tmp_path)
    args = {"user": cron_user, "pattern": r"run_etl\.py", "state": "paused"}
    res, proc = run_adhoc("etl_cron", args, check=True, diff=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert res["changed"] is True and listing(cron_user) == CRONTAB
    res, proc = run_adhoc("etl_cron", args)
    assert res["changed"] is True and len(res["lines"]) == 3
    res, proc = run_adhoc("etl_cron", {**args, "state": "active"})
    assert res["changed"] is True and listing(cron_user) == CRONTAB


def test_ansible_doc_renders():
    proc = ansible_doc("etl_cron")
    assert proc.returncode == 0, proc.stderr
    assert "process_pattern" in proc.stdout and "paused_lines" in proc.stdout


def test_process_detection_through_ansible_excludes_ansible_itself():
    """The pattern is in ansible's own argv here: only the real matching process is reported."""
    sleeper = subprocess.Popen(["/opt/etl/run_etl.py-cli", "60"], executable="/bin/sleep")
    try:
        res, proc = run_adhoc("etl_cron", {"state": "status", "process_pattern": "run_etl.py-cli"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [p["pid"] for p in res["running"]] == [sleeper.pid], res["running"]
    finally:
        sleeper.kill()
        sleeper.wait()
