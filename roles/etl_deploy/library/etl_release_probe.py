#!/usr/bin/python
"""Ansible module etl_release_probe: read the etl host's releases and compare one with a staged manifest."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: etl_release_probe
short_description: Read an ETL host's releases, current symlink and history, and compare a release with a manifest
description:
  - Read-only, in one run on the etl host, everything the C(etl_deploy) role needs to decide what to do
    (so that a redeploy of an installed, current release is one module run on the host).
  - Resolves the owner (and group, default the owner's primary group) of the release files.
  - Reads C(etl_dir)/current without following it (C(current.islnk) false with C(current.exists) true is a
    current that cannot be switched atomically) and the release history C(state_dir)/releases.json.
  - Compares C(etl_dir)/releases/C(version) with C(manifest) (the staged files from C(etl_release_stage)).
    A file is to install when it is missing, not a regular file, or differs in content (sha256), mode or
    owner/group; a directory of the release that is not owned by the owner/group with mode C(0755) makes
    its files to install too. Regular files of the installed release that the manifest does not hold are
    to remove, except byte-code (anything under C(__pycache__/) and C(*.pyc)), which the ETL writes itself.
  - Lists the directories under C(etl_dir)/releases (not hidden ones, not symlinks) with their mtimes, for
    pruning.
version_added: "1.0.0"
author: dedup-rollout
options:
  etl_dir:
    description: The ETL directory (holds C(releases/) and the C(current) symlink).
    type: path
    required: true
  version:
    description: The release to compare, a directory name under C(etl_dir)/releases.
    type: str
    required: true
  state_dir:
    description: Where C(releases.json) is kept; must be owned by the owner/group with mode C(0755) too.
    type: path
    required: true
  owner:
    description: User that owns the release files.
    type: str
    required: true
  group:
    description: Group of the release files (name or number); empty is the owner's primary group.
    type: str
    default: ""
  manifest:
    description: The staged files, as C(etl_release_stage) returns them in C(files).
    type: list
    elements: dict
    required: true
notes:
  - Supports check mode (it changes nothing, in any mode).
"""

EXAMPLES = r"""
- name: Read the installed releases on the etl host
  etl_release_probe:
    etl_dir: /opt/etl
    version: v2
    state_dir: /opt/etl/.dedup-rollout
    owner: etl
    manifest: "{{ etl_deploy_stage.files }}"
  register: etl_deploy_probe
"""

RETURN = r"""
uid:
  description: Numeric id of C(owner).
  returned: success
  type: int
gid:
  description: Numeric id of the group (C(group), or the owner's primary group).
  returned: success
  type: int
current:
  description: The C(current) entry of C(etl_dir), not followed.
  returned: success
  type: dict
  contains:
    exists: {description: Whether anything is there (a dangling symlink counts)., type: bool}
    islnk: {description: Whether it is a symlink., type: bool}
    lnk_target: {description: The symlink's target as written (empty when not a symlink)., type: str}
history:
  description: The parsed C(releases.json), or null when there is none.
  returned: success
  type: dict
directories:
  description: Of C(etl_dir)/releases, the release directory and C(state_dir), the ones missing or not owned
    by the owner/group with mode C(0755).
  returned: success
  type: list
  elements: str
install:
  description: Relative paths of the manifest's files that are missing or differ (content, mode, owner, or
    their directory's owner/mode); empty means the installed release is the staged one.
  returned: success
  type: list
  elements: str
remove:
  description: Absolute paths of regular files in the installed release that are not in the manifest (byte-code
    left out).
  returned: success
  type: list
  elements: str
releases:
  description: The directories under C(etl_dir)/releases, sorted by name.
  returned: success
  type: list
  elements: dict
  contains:
    name: {description: Directory name., type: str}
    path: {description: Absolute path., type: str}
    mtime: {description: Modification time (seconds since the epoch)., type: float}
"""

import grp
import hashlib
import json
import os
import pwd
import re
import stat

from ansible.module_utils.basic import AnsibleModule

BYTECODE_RE = re.compile(r"/__pycache__/|\.pyc$")
DIR_MODE = 0o755


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_ok(path: str, uid: int, gid: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and st.st_gid == gid and stat.S_IMODE(st.st_mode) == DIR_MODE


def file_ok(path: str, entry: dict, uid: int, gid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_gid != gid:
        return False
    if f"{stat.S_IMODE(st.st_mode):04o}" != entry["mode"]:
        return False
    return sha256(path) == entry["sha256"]


def owner_ids(module, owner: str, group: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        module.fail_json(msg=f"etl_release_probe: user {owner!r} (etl_deploy_owner) does not exist on this host")
    if not group:
        return pw.pw_uid, pw.pw_gid
    if group.isdigit():
        return pw.pw_uid, int(group)
    try:
        return pw.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        module.fail_json(msg=f"etl_release_probe: group {group!r} (etl_deploy_group) does not exist on this host")


def read_current(path: str) -> dict:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False, "islnk": False, "lnk_target": ""}
    link = stat.S_ISLNK(st.st_mode)
    return {"exists": True, "islnk": link, "lnk_target": os.readlink(path) if link else ""}


def read_history(module, path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        module.fail_json(msg=f"etl_release_probe: {path} is not valid JSON ({e}); fix or move it away")


def compare(release: str, manifest: list[dict], uid: int, gid: int) -> tuple[list[str], list[str]]:
    wanted = {e["path"] for e in manifest}
    bad_dirs = {d for d in {os.path.dirname(e["path"]) for e in manifest} - {""}
                if not dir_ok(os.path.join(release, d), uid, gid)}
    install = [e["path"] for e in manifest
               if os.path.dirname(e["path"]) in bad_dirs or not file_ok(os.path.join(release, e["path"]), e, uid, gid)]
    remove = []
    for root, dirs, files in os.walk(release):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if (os.path.relpath(path, release) not in wanted and not BYTECODE_RE.search(path)
                    and stat.S_ISREG(os.lstat(path).st_mode)):
                remove.append(path)
    return sorted(install), remove


def list_releases(releases: str) -> list[dict]:
    out = []
    try:
        names = sorted(os.listdir(releases))
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(releases, name)
        st = os.lstat(path)
        if not name.startswith(".") and stat.S_ISDIR(st.st_mode):
            out.append({"name": name, "path": path, "mtime": st.st_mtime})
    return out


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            etl_dir=dict(type="path", required=True),
            version=dict(type="str", required=True),
            state_dir=dict(type="path", required=True),
            owner=dict(type="str", required=True),
            group=dict(type="str", default=""),
            manifest=dict(type="list", elements="dict", required=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", p["version"]):
        module.fail_json(msg=f"etl_release_probe: version {p['version']!r} is not a plain directory name")
    for e in p["manifest"]:
        if not {"path", "sha256", "mode"} <= set(e) or os.path.isabs(e["path"]) or ".." in e["path"].split("/"):
            module.fail_json(msg=f"etl_release_probe: manifest entry {e!r} needs a relative path, sha256 and mode")
    uid, gid = owner_ids(module, p["owner"], p["group"])
    etl_dir = p["etl_dir"].rstrip("/") or "/"
    releases = os.path.join(etl_dir, "releases")
    release = os.path.join(releases, p["version"])
    directories = [d for d in (releases, release, p["state_dir"]) if not dir_ok(d, uid, gid)]
    if os.path.isdir(release):
        install, remove = compare(release, p["manifest"], uid, gid)
    else:
        install, remove = sorted(e["path"] for e in p["manifest"]), []
    module.exit_json(
        changed=False,
        uid=uid,
        gid=gid,
        current=read_current(os.path.join(etl_dir, "current")),
        history=read_history(module, os.path.join(p["state_dir"], "releases.json")),
        directories=directories,
        install=install,
        remove=remove,
        releases=list_releases(releases),
    )


if __name__ == "__main__":
    main()
