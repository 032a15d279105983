"""The ETL roles (etl_pause, etl_deploy, etl_smoke, etl_resume) through playbooks/etl_only.yml.

Real parts only: the lab's clone database on the harness cluster, the ETL user's real crontab, the real
reference ETL (etl/releases), real processes and the real ansible-playbook.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import tarfile
import time

from psycopg2 import sql

from harness import REPO

PLAYBOOK = REPO / "playbooks" / "etl_only.yml"
MARK = "#dedup-paused# "


# --------------------------------------------------------------------------- helpers


def etl_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "run_etl.py" in ln and not ln.lstrip().startswith("#")]


def deduplicate_and_constrain(lab) -> None:
    """What the migration does, by hand: keep the oldest row per natural key, add the UNIQUE constraints."""
    conn = lab.admin_conn()
    try:
        with conn.cursor() as cur:
            for table, key in lab.natural_keys.items():
                tbl = sql.Identifier(lab.schema, table)
                cols = sql.SQL(", ").join(map(sql.Identifier, key))
                cur.execute(sql.SQL(
                    "DELETE FROM {tbl} WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
                    "(PARTITION BY {cols} ORDER BY id) AS rn FROM {tbl}) s WHERE rn > 1)"
                ).format(tbl=tbl, cols=cols))
                cur.execute(
                    "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'u'",
                    (f"{lab.schema}.{table}",),
                )
                if not cur.fetchone():
                    cur.execute(sql.SQL("ALTER TABLE {tbl} ADD CONSTRAINT {name} UNIQUE ({cols})").format(
                        tbl=tbl, name=sql.Identifier(f"{table}_nk"), cols=cols))
    finally:
        conn.close()


def start_fake_etl(user: str, seconds: int) -> subprocess.Popen:
    """A long-running process of the ETL user whose command line matches run_etl\\.py."""
    proc = subprocess.Popen(
        ["runuser", "-u", user, "--", "/bin/bash", "-c",
         f"exec -a 'python3 run_etl.py nashville properties' sleep {seconds}"],
        start_new_session=True,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        out = subprocess.run(["pgrep", "-u", user, "-f", "run_etl.py"], capture_output=True, text=True).stdout
        if out.strip():
            return proc
        time.sleep(0.1)
    raise AssertionError("the fake ETL process did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def tree_state(path) -> dict:
    """Every path under ``path`` with its type, mode and (for files) content or (for links) target."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[p] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as fh:
                    out[p] = ("file", stat.S_IMODE(st.st_mode), fh.read())
    return out


# --------------------------------------------------------------------------- pause / resume


def test_pause_then_resume_restores_the_crontab_byte_for_byte(lab):
    before = lab.crontab()
    assert len(etl_lines(before)) >= 2 and MARK not in before

    res = lab.playbook(PLAYBOOK, "--tags", "etl_pause", extra_vars={"etl_pause_wait_seconds": 5})
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") == 1
    paused = lab.crontab()
    assert etl_lines(paused) == [], paused
    for line in etl_lines(before):
        assert MARK + line in paused.splitlines()
    # Everything that is not an ETL job line is untouched.
    assert [ln for ln in paused.splitlines() if not ln.startswith(MARK)] == \
        [ln for ln in before.splitlines() if ln not in etl_lines(before)]

    again = lab.playbook(PLAYBOOK, "--tags", "etl_pause", extra_vars={"etl_pause_wait_seconds": 5})
    assert again.rc == 0 and again.changed("lab-etl") == 0, again.output[-3000:]
    assert lab.crontab() == paused

    res = lab.playbook(PLAYBOOK, "--tags", "etl_resume")
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") == 1
    assert lab.crontab() == before

    res = lab.playbook(PLAYBOOK, "--tags", "etl_resume")
    assert res.rc == 0 and res.changed("lab-etl") == 0, res.output[-3000:]
    assert lab.crontab() == before


def test_pause_waits_for_a_running_etl_and_fails_clearly_after_the_bounded_wait(lab):
    before = lab.crontab()
    # A run that ends within the wait: the pause waits for it, then succeeds.
    short = start_fake_etl(lab.etl_user, 6)
    try:
        t0 = time.time()
        res = lab.playbook(PLAYBOOK, "--tags", "etl_pause",
                           extra_vars={"etl_pause_wait_seconds": 60, "etl_pause_poll_interval": 1})
        elapsed = time.time() - t0
        assert res.rc == 0, res.output[-4000:]
        assert short.poll() is not None, "the pause returned while the ETL was still running"
        assert elapsed < 60
    finally:
        stop(short)

    # A run that outlives the wait: fail naming the pid and command line, the crontab stays paused.
    lab.set_crontab(before)
    long = start_fake_etl(lab.etl_user, 120)
    try:
        t0 = time.time()
        res = lab.playbook(PLAYBOOK, "--tags", "etl_pause",
                           extra_vars={"etl_pause_wait_seconds": 3, "etl_pause_poll_interval": 1})
        elapsed = time.time() - t0
        assert res.rc != 0
        pids = subprocess.run(["pgrep", "-u", lab.etl_user, "-f", "run_etl.py"],
                              capture_output=True, text=True).stdout.split()
        assert pids and any(f"pid {pid}" in res.output for pid in pids), res.output[-4000:]
        assert "python3 run_etl.py nashville properties" in res.output
        assert "STAY PAUSED" in res.output
        assert "--tags etl_resume" in res.output
        assert elapsed < 60
        assert etl_lines(lab.crontab()) == [] and MARK in lab.crontab()
    finally:
        stop(long)
    res = lab.playbook(PLAYBOOK, "--tags", "etl_resume")
    assert res.rc == 0 and lab.crontab() == before


# --------------------------------------------------------------------------- deploy


def test_deploy_v2_switches_current_keeps_v1_renders_keys_and_is_idempotent(lab):
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", extra_vars={"dedup_run_id": "run-deploy-1"})
    assert res.rc == 0, res.output[-4000:]
    assert lab.current_release() == "releases/v2"
    assert os.path.islink(lab.etl_dir / "current")
    assert (lab.etl_dir / "releases" / "v1" / "run_etl.py").is_file()
    v2 = lab.etl_dir / "releases" / "v2"
    for src in (REPO / "etl" / "releases" / "v2").glob("*.py"):
        assert (v2 / src.name).read_bytes() == src.read_bytes()
    keys = json.loads((v2 / "natural_keys.json").read_text())
    assert keys == lab.natural_keys

    uid = pwd.getpwnam(lab.etl_user).pw_uid
    for path in [v2, *v2.iterdir(), lab.etl_dir / ".dedup-rollout" / "releases.json"]:
        st = os.lstat(path)
        assert st.st_uid == uid, path
        assert not st.st_mode & stat.S_IWOTH, path
    assert os.lstat(lab.etl_dir / "current").st_uid == uid

    history = json.loads((lab.etl_dir / ".dedup-rollout" / "releases.json").read_text())
    assert history["format"] == 1 and history["current"] == "v2"
    (entry,) = history["history"]
    assert (entry["run_id"], entry["action"], entry["from"], entry["to"]) == ("run-deploy-1", "deploy", "v1", "v2")
    assert entry["time"].endswith("Z")

    # The ETL writes byte-code into the release; a redeploy of the same content leaves everything alone.
    lab.run_etl("nashville", "properties", check=False)
    state = tree_state(lab.etl_dir / "releases")
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", extra_vars={"dedup_run_id": "run-deploy-2"})
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") == 0, res.output[-4000:]
    assert tree_state(lab.etl_dir / "releases") == state
    assert len(json.loads((lab.etl_dir / ".dedup-rollout" / "releases.json").read_text())["history"]) == 1


def test_redeploy_is_a_no_op_and_puts_back_what_was_changed_by_hand(lab, tmp_path):
    # Scratch copies go to the controller's temporary directory: a private one, to see that none is left behind.
    scratch = tmp_path / "controller-tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", env=env, extra_vars={"dedup_run_id": "run-hand-1"})
    assert res.rc == 0, res.output[-4000:]
    v2 = lab.etl_dir / "releases" / "v2"
    # Byte-code as the ETL writes it (python -B or PYTHONDONTWRITEBYTECODE may keep a real run from it).
    uid = pwd.getpwnam(lab.etl_user).pw_uid
    pycache = [v2 / "__pycache__" / "etl_base.cpython-311.pyc", v2 / "stray.pyc"]
    pycache[0].parent.mkdir()
    for p in pycache:
        p.write_bytes(b"byte-code")
        os.chown(p, uid, -1)
    state = tree_state(lab.etl_dir)

    # Nothing to do: no task of the role changes anything, nothing is touched, nothing is copied.
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", env=env, extra_vars={"dedup_run_id": "run-hand-2"})
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") == 0, res.output[-4000:]
    assert "(identical content); current already v2." in res.output
    assert tree_state(lab.etl_dir) == state
    assert list(scratch.iterdir()) == []

    # By hand: one file edited with the same size and mtime (only its content tells), one made group-writable,
    # one given to root, one file added, one removed, byte-code added.
    edited = v2 / "etl_base.py"
    original = edited.read_bytes()
    st = edited.stat()
    tampered = bytearray(original)
    i = original.index(b"ON CONFLICT")
    tampered[i:i + 11] = b"on conflict"
    edited.write_bytes(bytes(tampered))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert edited.stat().st_size == st.st_size and edited.stat().st_mtime_ns == st.st_mtime_ns
    os.chmod(v2 / "config.py", 0o664)
    os.chown(v2 / "fixture_api.py", 0, 0)
    (v2 / "notes.txt").write_text("left by hand\n")
    run_etl = (v2 / "run_etl.py").read_bytes()
    (v2 / "run_etl.py").unlink()
    (v2 / "__pycache__" / "extra.cpython-311.pyc").write_bytes(b"byte-code")

    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", env=env, extra_vars={"dedup_run_id": "run-hand-3"})
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") > 0
    assert "(files changed); current already v2." in res.output
    assert edited.read_bytes() == original
    assert (v2 / "run_etl.py").read_bytes() == run_etl
    assert stat.S_IMODE((v2 / "config.py").stat().st_mode) == 0o644
    assert (v2 / "fixture_api.py").stat().st_uid == uid
    assert not (v2 / "notes.txt").exists()
    assert (v2 / "__pycache__" / "extra.cpython-311.pyc").read_bytes() == b"byte-code"
    assert all(p.exists() for p in pycache)
    assert lab.current_release() == "releases/v2"
    assert len(json.loads((lab.etl_dir / ".dedup-rollout" / "releases.json").read_text())["history"]) == 1
    assert list(scratch.iterdir()) == []

    # And the run after that has nothing to do again.
    (v2 / "__pycache__" / "extra.cpython-311.pyc").unlink()
    state = tree_state(lab.etl_dir)
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", env=env, extra_vars={"dedup_run_id": "run-hand-4"})
    assert res.rc == 0, res.output[-4000:]
    assert res.changed("lab-etl") == 0, res.output[-4000:]
    assert tree_state(lab.etl_dir) == state


def test_deploy_of_the_buggy_release_is_refused_before_the_switch(lab, tmp_path):
    # v1 (ON CONFLICT DO NOTHING, no target), shipped as an archive under another version name.
    archive = tmp_path / "etl-v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(REPO / "etl" / "releases" / "v1", arcname="v1")
    before = tree_state(lab.etl_dir)
    # Check mode stages and scans on the controller too, so it refuses as well.
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", check=True,
                       extra_vars={"etl_deploy_version": "v3", "etl_deploy_src": str(archive)})
    assert res.rc != 0 and "refusing release v3" in res.output, res.output[-3000:]
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy",
                       extra_vars={"etl_deploy_version": "v3", "etl_deploy_src": str(archive)})
    assert res.rc != 0
    assert "refusing release v3" in res.output
    assert "etl_base.py:" in res.output and "ON CONFLICT DO NOTHING" in res.output
    assert "task_requirements" in res.output
    assert lab.current_release() == "releases/v1"
    assert not (lab.etl_dir / "releases" / "v3").exists()
    assert tree_state(lab.etl_dir) == before


def test_deploy_from_git_and_pruning_keeps_current_and_previous(lab, tmp_path):
    repo = tmp_path / "etl-repo"
    (repo / "etl").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(REPO / "etl" / "releases" / "v2"), str(repo / "etl" / "app")], check=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "v2"], check=True)
    subprocess.run([*git, "tag", "release-2"], check=True)

    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy", extra_vars={
        "etl_deploy_version": "v2-git", "etl_deploy_git_repo": f"file://{repo}",
        "etl_deploy_git_version": "release-2", "etl_deploy_git_subdir": "etl/app",
        "etl_deploy_keep_releases": 2, "dedup_run_id": "run-git",
    })
    assert res.rc == 0, res.output[-4000:]
    assert lab.current_release() == "releases/v2-git"
    rel = lab.etl_dir / "releases" / "v2-git"
    assert not (rel / ".git").exists()
    assert (rel / "etl_base.py").read_bytes() == (REPO / "etl" / "releases" / "v2" / "etl_base.py").read_bytes()
    assert (rel / "natural_keys.json").is_file()

    # Another release with keep 2: v1 goes, the current (v2) and the previous (v2-git) stay.
    res = lab.playbook(PLAYBOOK, "--tags", "etl_deploy",
                       extra_vars={"etl_deploy_keep_releases": 2, "dedup_run_id": "run-v2"})
    assert res.rc == 0, res.output[-4000:]
    assert sorted(p.name for p in (lab.etl_dir / "releases").iterdir()) == ["v2", "v2-git"]
    history = json.loads((lab.etl_dir / ".dedup-rollout" / "releases.json").read_text())["history"]
    assert [(h["run_id"], h["from"], h["to"]) for h in history] == [
        ("run-git", "v1", "v2-git"), ("run-v2", "v2-git", "v2")]


# --------------------------------------------------------------------------- smoke and the whole ETL half


def test_whole_etl_half_with_constraints_passes_and_adds_no_duplicates(lab):
    deduplicate_and_constrain(lab)
    cron_before = lab.crontab()
    rows_before = lab.counts()
    assert all(v == 0 for v in lab.duplicates().values())

    res = lab.playbook(PLAYBOOK, extra_vars={"dedup_run_id": "run-smoke-ok"})
    assert res.rc == 0, res.output[-6000:]
    assert "Smoke test of releases/v2 passed" in res.output
    assert "after run 1" in res.output and "after run 2" in res.output
    assert lab.current_release() == "releases/v2"
    assert lab.crontab() == cron_before
    assert all(v == 0 for v in lab.duplicates().values()), lab.duplicates()
    # The lab's fill already holds what the fixture API serves for nashville: nothing new to insert.
    rows_after = lab.counts()
    assert all(rows_after[t] >= rows_before[t] for t in rows_before)
    # The ETL still works from cron's point of view: one more run changes no row count.
    lab.run_etl("nashville", "tasks")
    assert lab.counts() == rows_after


def test_smoke_failure_leaves_the_etl_paused_and_names_the_rollback_command(lab):
    # No constraints yet: v2's upsert fails for real in the ETL; the extra command exits 1.
    cron_before = lab.crontab()
    res = lab.playbook(PLAYBOOK, extra_vars={
        "dedup_run_id": "run-smoke-bad",
        "etl_smoke_commands": ["run_etl.py nashville properties", ["-c", "import sys; sys.exit(1)"]],
    })
    assert res.rc != 0
    assert "etl_smoke FAILED" in res.output
    assert "exited with rc=1" in res.output
    assert "no unique or exclusion constraint" in res.output
    assert f"ansible-playbook rollback.yml -i {lab.inventory} -e dedup_run_id=run-smoke-bad" in res.output
    assert "STAY PAUSED" in res.output
    paused = lab.crontab()
    assert etl_lines(paused) == [] and paused != cron_before
    assert lab.current_release() == "releases/v2"
    # Resuming by hand (the documented way) gives the original crontab back.
    res = lab.playbook(PLAYBOOK, "--tags", "etl_resume")
    assert res.rc == 0 and lab.crontab() == cron_before


def test_check_mode_changes_nothing(lab):
    cron_before = lab.crontab()
    tree_before = tree_state(lab.etl_dir)
    rows_before = lab.counts()
    res = lab.playbook(PLAYBOOK, check=True, extra_vars={"dedup_run_id": "run-check"})
    assert res.rc == 0, res.output[-6000:]
    assert "Would pause" in res.output
    assert "Would install release v2" in res.output and "would switch from v1 to v2" in res.output
    assert "Check mode: the smoke test runs nothing" in res.output
    assert lab.crontab() == cron_before
    assert tree_state(lab.etl_dir) == tree_before
    assert lab.counts() == rows_before
