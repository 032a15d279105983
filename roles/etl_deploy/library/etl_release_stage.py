#!/usr/bin/python
"""Ansible module etl_release_stage: stage an ETL release in a scratch dir, render its keys, scan it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: etl_release_stage
short_description: Stage an ETL release in a scratch directory, render natural_keys.json, scan for the upsert bug
description:
  - Copies a release from a directory or unpacks it from an archive (C(.tar.gz), C(.tgz), C(.tar)) into
    C(dest), an empty scratch directory; VCS metadata and byte-code (C(exclude)) are left out, file modes
    are normalised (no group/world write).
  - Writes C(natural_keys.json) (C(natural_keys), sorted, indented, newline-terminated) into the staged
    release, replacing any copy shipped with it, so the ETL's conflict targets come from the rollout's
    C(dedup_tables).
  - Scans the staged C(*.py) and C(*.sql) files for C(ON CONFLICT DO NOTHING) without a conflict target.
    Python files are parsed and only string literals that are not docstrings are scanned (comments and
    documentation that mention the bug do not count); SQL files are scanned without their comments.
  - A finding names the file, the line and the managed table(s) it writes to. When the INSERT's table is
    a parameter (a placeholder such as C({tbl}) or C(%s)), the finding applies to every managed table
    the release mentions anywhere in its code; a statement that only writes to tables outside
    C(tables) is not a finding.
  - Returns a manifest (relative path, sha256, mode of every staged file) and a digest over it.
  - Runs on the controller (delegate_to localhost) before anything is installed on a target.
  - Without C(dest), stages into a new scratch directory of the controller's temporary directory (prefix
    C(etl-release-)), returned as C(dest). With C(keep=false) the staged copy is removed before the module
    returns (only the manifest, digest and findings are wanted), and on a failure too.
version_added: "1.0.0"
author: dedup-rollout
options:
  src:
    description:
      - A release directory, or an archive of one.
      - An archive holding one top-level directory is unpacked from inside it.
    type: path
    required: true
  dest:
    description:
      - Scratch directory to stage into; created if missing, must be empty.
      - Default a new directory in the controller's temporary directory.
    type: path
  keep:
    description: Keep the staged copy (false removes C(dest) before returning, and on a failure).
    type: bool
    default: true
  expect_digest:
    description:
      - The digest of an earlier staging of the same release; a different one fails (the source changed
        in between) and removes the staged copy.
    type: str
  natural_keys:
    description: Table name -> list of key columns, written to C(natural_keys.json). Empty writes no file.
    type: dict
    default: {}
  natural_keys_file:
    description: Name of the rendered file inside the release.
    type: str
    default: natural_keys.json
  tables:
    description: The managed tables (the ones the rollout puts UNIQUE constraints on).
    type: list
    elements: str
    default: []
  exclude:
    description: fnmatch patterns of file or directory names left out of the release.
    type: list
    elements: str
    default: [".git", "__pycache__", "*.pyc", ".dedup-release.json"]
notes:
  - Supports check mode; the scratch directory is written in check mode too (it is not managed state),
    so the scan and the manifest are available to a C(--check) run. C(changed) is true when files were staged.
"""

EXAMPLES = r"""
- name: Stage and scan the release on the controller
  etl_release_stage:
    src: "{{ playbook_dir }}/../etl/releases/v2"
    dest: /tmp/stage.abc123
    natural_keys: {task_photos: [task_pk, photo_id]}
    tables: [task_photos]
  delegate_to: localhost
  register: etl_deploy_stage

- name: Only scan it and return its manifest (nothing is left on the controller)
  etl_release_stage:
    src: "{{ playbook_dir }}/../etl/releases/v2"
    keep: false
  delegate_to: localhost
  register: etl_deploy_stage
"""

RETURN = r"""
dest:
  description: The staging directory (removed again when C(keep=false)).
  returned: success
  type: str
files:
  description: The staged files, sorted by path.
  returned: success
  type: list
  elements: dict
  contains:
    path: {description: Path relative to the release root., type: str}
    sha256: {description: Content hash., type: str}
    mode: {description: Octal mode string (for example C(0644))., type: str}
digest:
  description: sha256 over the manifest (paths, hashes, modes); equal digests mean identical releases.
  returned: success
  type: str
findings:
  description: Upserts without a conflict target on managed tables (empty means the release passes).
  returned: success
  type: list
  elements: dict
  contains:
    file: {description: Path relative to the release root., type: str}
    line: {description: Line of the statement., type: int}
    statement: {description: The offending statement (shortened)., type: str}
    target: {description: The INSERT target as written (may be a placeholder)., type: str}
    tables: {description: Managed tables the statement writes to., type: list}
    generic: {description: True when the table is a parameter of the statement., type: bool}
    references: {description: "For a generic finding, where the managed tables are named (C(file:line))." , type: list}
scanned:
  description: Relative paths of the scanned files.
  returned: success
  type: list
"""

import ast
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile

from ansible.module_utils.basic import AnsibleModule

BUG_RE = re.compile(r"ON\s+CONFLICT\s+DO\s+NOTHING", re.I)
INSERT_RE = re.compile(r"INSERT\s+INTO\s+((?:\"[^\"]+\"|[\w{}%.\[\]'\"$-])+)", re.I)
SQL_COMMENT_RE = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)


def excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def copy_tree(src: str, dest: str, patterns: list[str]) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not excluded(d, patterns))
        rel = os.path.relpath(root, src)
        target_dir = dest if rel == "." else os.path.join(dest, rel)
        os.makedirs(target_dir, exist_ok=True)
        for name in sorted(files):
            if excluded(name, patterns):
                continue
            s = os.path.join(root, name)
            if os.path.islink(s) or not os.path.isfile(s):
                continue  # releases are plain files: links and specials are not copied
            shutil.copyfile(s, os.path.join(target_dir, name))
            os.chmod(os.path.join(target_dir, name), stat.S_IMODE(os.stat(s).st_mode))


def safe_members(tar: tarfile.TarFile, module) -> list[tarfile.TarInfo]:
    out = []
    for m in tar.getmembers():
        name = os.path.normpath(m.name)
        if name.startswith(("/", "..")) or os.path.isabs(name):
            module.fail_json(msg=f"etl_release_stage: archive member {m.name!r} escapes the release directory")
        if m.isdir() or m.isfile():
            out.append(m)
    return out


def unpack(src: str, dest: str, patterns: list[str], module) -> None:
    tmp = tempfile.mkdtemp(prefix="etl-unpack-", dir=os.path.dirname(dest.rstrip("/")) or None)
    try:
        with tarfile.open(src, "r:*") as tar:
            members = safe_members(tar, module)
            for m in members:
                if m.isdir():
                    os.makedirs(os.path.join(tmp, m.name), exist_ok=True)
                    continue
                path = os.path.join(tmp, m.name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fh = tar.extractfile(m)
                with open(path, "wb") as out:
                    shutil.copyfileobj(fh, out)
                os.chmod(path, m.mode & 0o777)
        root = tmp
        entries = [e for e in os.listdir(tmp) if not excluded(e, patterns)]
        if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0])):
            root = os.path.join(tmp, entries[0])
        copy_tree(root, dest, patterns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def normalise_modes(dest: str) -> None:
    for root, dirs, files in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            p = os.path.join(root, f)
            mode = stat.S_IMODE(os.stat(p).st_mode)
            os.chmod(p, 0o755 if mode & 0o111 else 0o644)
    os.chmod(dest, 0o755)


def manifest(dest: str) -> list[dict]:
    out = []
    for root, dirs, files in os.walk(dest):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 16), b""):
                    h.update(chunk)
            out.append({
                "path": os.path.relpath(p, dest),
                "sha256": h.hexdigest(),
                "mode": f"{stat.S_IMODE(os.stat(p).st_mode):04o}",
            })
    return sorted(out, key=lambda e: e["path"])


# ------------------------------------------------------------------ scanning


def python_strings(text: str) -> list[tuple[int, str]] | None:
    """(line, text) of every string literal that is not a docstring; f-string fields become ``{}``."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    inside_fstring = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                inside_fstring.add(id(v))
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    parts.append(v.value)
                else:
                    parts.append("{}")
            out.append((node.lineno, "".join(parts)))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and id(node) not in inside_fstring):
            out.append((node.lineno, node.value))
    return out


def text_chunks(rel: str, text: str) -> list[tuple[int, str]]:
    if rel.endswith(".py"):
        strings = python_strings(text)
        if strings is not None:
            return strings
        # Not parseable: scan the raw text without comment lines.
        lines = ["" if ln.lstrip().startswith("#") else ln for ln in text.splitlines()]
        return [(1, "\n".join(lines))]
    # SQL: drop comments but keep line numbers.
    return [(1, SQL_COMMENT_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text))]


def table_of(target: str, tables: list[str]) -> tuple[list[str], bool]:
    """Managed tables named by an INSERT target, and whether the target is a parameter."""
    if re.search(r"[{}%$]|\[", target):
        return [], True
    last = target.replace('"', "").split(".")[-1]
    return ([last] if last in tables else []), False


def scan(dest: str, files: list[dict], tables: list[str]) -> tuple[list[dict], list[str]]:
    findings, scanned = [], []
    mentions: dict[str, list[str]] = {}
    generic = []
    for entry in files:
        rel = entry["path"]
        if not rel.endswith((".py", ".sql")):
            continue
        scanned.append(rel)
        with open(os.path.join(dest, rel), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        for lineno, chunk in text_chunks(rel, text):
            for t in tables:
                if re.search(r"(?<![\w])" + re.escape(t) + r"(?![\w])", chunk):
                    mentions.setdefault(t, []).append(f"{rel}:{lineno}")
            for m in BUG_RE.finditer(chunk):
                before = chunk[: m.start()]
                line = lineno + before.count("\n")
                inserts = list(INSERT_RE.finditer(before))
                stmt_start = inserts[-1].start() if inserts else max(0, m.start() - 120)
                statement = " ".join(chunk[stmt_start: m.end()].split())
                if len(statement) > 200:
                    statement = statement[:90] + " ... " + statement[-90:]
                target = inserts[-1].group(1) if inserts else ""
                named, is_param = table_of(target, tables) if target else ([], True)
                finding = {"file": rel, "line": line, "statement": statement, "target": target,
                           "tables": named, "generic": is_param, "references": []}
                if is_param:
                    generic.append(finding)
                elif named:
                    findings.append(finding)
    for finding in generic:
        hit = sorted(mentions)
        if hit:
            finding["tables"] = hit
            finding["references"] = sorted({ref for t in hit for ref in mentions[t][:3]})
            findings.append(finding)
    return sorted(findings, key=lambda f: (f["file"], f["line"])), scanned


def stage(module, src: str, dest: str) -> tuple[list[dict], str, list[dict], list[str]]:
    """Stage ``src`` into ``dest`` and scan it: manifest, digest, findings, scanned files."""
    p = module.params
    patterns = p["exclude"] + [p["natural_keys_file"]]
    if os.path.isdir(src):
        copy_tree(src, dest, patterns)
    elif tarfile.is_tarfile(src):
        unpack(src, dest, patterns, module)
    else:
        module.fail_json(msg=f"etl_release_stage: {src} is neither a directory nor a tar archive (.tar.gz/.tgz/.tar)")
    if p["natural_keys"]:
        keys = {str(t): [str(c) for c in cols] for t, cols in p["natural_keys"].items()}
        with open(os.path.join(dest, p["natural_keys_file"]), "w", encoding="utf-8") as fh:
            json.dump(keys, fh, indent=2, sort_keys=True)
            fh.write("\n")
    normalise_modes(dest)
    files = manifest(dest)
    if not files:
        module.fail_json(msg=f"etl_release_stage: release source {src} holds no files")
    digest = hashlib.sha256(
        "".join(f"{f['path']}\0{f['sha256']}\0{f['mode']}\n" for f in files).encode()
    ).hexdigest()
    if p["expect_digest"] and digest != p["expect_digest"]:
        module.fail_json(msg=f"etl_release_stage: release source {src} changed while deploying (digest {digest[:12]}, "
                             f"was {p['expect_digest'][:12]}); nothing was installed from it, run the deploy again")
    findings, scanned = scan(dest, files, p["tables"])
    return files, digest, findings, scanned


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            dest=dict(type="path"),
            keep=dict(type="bool", default=True),
            expect_digest=dict(type="str"),
            natural_keys=dict(type="dict", default={}, no_log=False),  # table -> key columns, not a secret
            natural_keys_file=dict(type="str", default="natural_keys.json"),
            tables=dict(type="list", elements="str", default=[]),
            exclude=dict(type="list", elements="str", default=[".git", "__pycache__", "*.pyc",
                                                              ".dedup-release.json"]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    src, dest = p["src"].rstrip("/") or "/", p["dest"]
    if not os.path.exists(src):
        module.fail_json(msg=f"etl_release_stage: release source {src} does not exist (on the controller)")
    if dest and os.path.isdir(dest) and os.listdir(dest):
        module.fail_json(msg=f"etl_release_stage: scratch directory {dest} is not empty")
    if dest:
        os.makedirs(dest, exist_ok=True)
    else:
        dest = tempfile.mkdtemp(prefix="etl-release-")
    # Removed when not kept, and on a failure if the module made it or it is not to be kept.
    drop = not p["keep"] or not p["dest"]
    try:
        files, digest, findings, scanned = stage(module, src, dest)
    except BaseException:
        # fail_json raises SystemExit after printing; the staged copy goes either way.
        if drop:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    if not p["keep"]:
        shutil.rmtree(dest, ignore_errors=True)
    module.exit_json(changed=True, dest=dest, files=files, digest=digest, findings=findings, scanned=scanned)


if __name__ == "__main__":
    main()
