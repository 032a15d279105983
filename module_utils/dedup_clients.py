"""Find the pg_dump / pg_restore that can work with a server's major version (read-only).

pg_dump dumps servers of its own major version or older ("server version mismatch" otherwise), and pg_restore
reads archives written by a pg_dump of its own major version or older. So a client fits a server when its major
version is the server's or newer; the same major is preferred, then the closest newer one.

Where to look, in order: the configured value (a path or a name on PATH; when it does not fit, the caller
refuses and names the variable), PATH, the extra directories given, then the usual per-version directories of
the distributions and Homebrew.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

# The usual per-version bin directories (Debian/Ubuntu, PGDG RPMs, Homebrew) and the source-build default.
VERSIONED_DIR_PATTERNS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)
PLAIN_DIRS = ("/usr/local/pgsql/bin",)
VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?(?:\.(\d+))?")


class ClientError(Exception):
    """A configured client that is missing, unreadable or too old (the message names what to set)."""


def version_num(text: str) -> int | None:
    """server_version_num-style number from ``<tool> --version`` output (``pg_dump (PostgreSQL) 18.6`` -> 180006)."""
    m = VERSION_RE.search(text or "")
    if not m:
        return None
    a, b, c = (int(x) if x else 0 for x in m.groups())
    return a * 10000 + b if a >= 10 else a * 10000 + b * 100 + c


def major_key(num: int) -> int:
    """The major version part of a version number, comparable across the 9.x and 10+ numbering."""
    return num // 10000 * 10000 if num >= 100000 else num // 100 * 100


def major_text(num: int) -> str:
    return str(num // 10000) if num >= 100000 else f"{num // 10000}.{num // 100 % 100}"


def probe(path: str, timeout: int = 20) -> dict | None:
    """``{path, version, version_num, major}`` of an executable, from its ``--version``; None when it is not one."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return None
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    num = version_num(proc.stdout)
    if proc.returncode != 0 or num is None:
        return None
    return {"path": path, "version": proc.stdout.strip(), "version_num": num, "major": major_text(num)}


def _numbers(path: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", path)]


def search_dirs(extra_dirs=None, path_env: str | None = None) -> list[tuple[str, str]]:
    """(directory, where it comes from) in search order, each once: PATH, the extra dirs, the usual dirs
    (newest major first)."""
    out, seen = [], set()

    def add(d, origin):
        d = os.path.expanduser(d)
        if d and d not in seen:
            seen.add(d)
            out.append((d, origin))

    for d in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
        add(d, "PATH")
    for d in extra_dirs or []:
        add(d, "preflight_pg_bin_dirs")
    for pattern in VERSIONED_DIR_PATTERNS:
        for d in sorted(glob.glob(pattern), key=_numbers, reverse=True):
            add(d, "usual directory")
    for d in PLAIN_DIRS:
        add(d, "usual directory")
    return out


def candidates(tool: str, dirs: list[tuple[str, str]]) -> list[dict]:
    """Every runnable ``tool`` in ``dirs`` (same file once), with its version and where it was found."""
    out, seen = [], set()
    for d, origin in dirs:
        path = os.path.join(d, tool)
        real = os.path.realpath(path)
        if real in seen:
            continue
        info = probe(path)
        if info is None:
            continue
        seen.add(real)
        info["source"] = origin
        out.append(info)
    return out


def choose(cands: list[dict], min_num: int, prefer_num: int, prefer_dir: str | None = None) -> dict | None:
    """The client to use: in ``prefer_dir`` with the preferred major, else the first with the preferred major,
    else the closest newer major (first found among equals); None when no candidate is new enough."""
    fit = [c for c in cands if major_key(c["version_num"]) >= major_key(min_num)]
    same = [c for c in fit if major_key(c["version_num"]) == major_key(prefer_num)]
    if prefer_dir:
        for c in same:
            if os.path.dirname(c["path"]) == prefer_dir:
                return c
    if same:
        return same[0]
    if fit:
        return min(fit, key=lambda c: major_key(c["version_num"]))
    return None


def resolve_configured(value: str, var: str, path_env: str | None = None) -> dict:
    """The configured client (an absolute path or a name looked up on PATH), probed; ClientError if unusable."""
    path = value
    if os.sep not in value:
        found = None
        for d in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
            cand = os.path.join(d, value)
            if d and os.path.isfile(cand) and os.access(cand, os.X_OK):
                found = cand
                break
        if found is None:
            raise ClientError(f"{var}={value}: there is no {value} on PATH")
        path = found
    info = probe(os.path.expanduser(path))
    if info is None:
        raise ClientError(f"{var}={value}: not an executable PostgreSQL client that answers --version")
    info["source"] = var
    return info


def describe(cands: list[dict]) -> str:
    return ", ".join(f"{c['path']} ({c['major']})" for c in cands) or "none"


def find_clients(server_num: int, tools, configured: dict, var_names: dict, extra_dirs=None) -> dict:
    """Pick each of ``tools`` (pg_dump before pg_restore) for a server of version ``server_num``.

    ``configured``: tool -> user-given value or None; ``var_names``: tool -> variable to name in messages.
    Returns ``{tool: info or None, 'searched': [...], 'found': {tool: [...]}, 'problems': [(kind, text)]}``:
    kind ``configured`` (the configured client does not fit: it is never replaced) or ``missing`` (none found);
    the text names what to set.
    """
    dirs = search_dirs(extra_dirs)
    out: dict = {"searched": [d for d, _o in dirs], "found": {}, "problems": []}
    server_major = major_text(server_num)
    dump_info = None
    for tool in ("pg_dump", "pg_restore"):
        if tool not in tools:
            continue
        var = var_names.get(tool) or tool
        min_num = server_num
        if tool == "pg_restore" and dump_info is not None:
            min_num = max(major_key(server_num), major_key(dump_info["version_num"]))
        cands = candidates(tool, dirs)
        out["found"][tool] = cands
        if configured.get(tool):
            try:
                info = resolve_configured(configured[tool], var)
            except ClientError as exc:
                out["problems"].append(("configured", str(exc)))
                out[tool] = None
                continue
            if major_key(info["version_num"]) < major_key(min_num):
                better = choose(cands, min_num, min_num)
                why = ("pg_dump refuses a newer server (server version mismatch)" if tool == "pg_dump" else
                       "pg_restore cannot read archives of a newer pg_dump or restore into a newer server reliably")
                against = (f"the server (PostgreSQL {server_major})" if min_num == server_num else
                           f"the pg_dump used ({dump_info['path']}, {dump_info['major']})")
                out["problems"].append(("configured",
                    f"{var}={configured[tool]} is {tool} {info['major']}, older than {against}: {why}. "
                    f"Set {var} to a {tool} of major version {major_text(min_num)} or newer"
                    + (f" (found here: {better['path']}, {better['major']})" if better else "")
                    + f", or leave {var} unset to use the one found"))
                out[tool] = None
                continue
        else:
            prefer = dump_info["version_num"] if (tool == "pg_restore" and dump_info) else server_num
            info = choose(cands, min_num, prefer, os.path.dirname(dump_info["path"]) if dump_info else None)
            if info is None:
                want = major_text(min_num)
                out["problems"].append(("missing",
                    f"no {tool} of PostgreSQL {major_text(min_num)} or newer on this host (found: {describe(cands)}; "
                    f"looked in PATH, preflight_pg_bin_dirs and {', '.join(VERSIONED_DIR_PATTERNS + PLAIN_DIRS)}). "
                    f"Install the PostgreSQL {want} client (e.g. postgresql-client-{want}), "
                    f"or set {var} to its path, or add its bin directory to preflight_pg_bin_dirs"))
                out[tool] = None
                continue
        out[tool] = info
        if tool == "pg_dump":
            dump_info = info
    return out
