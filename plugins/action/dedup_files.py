"""Owner-only files on the controller, for the actions that write the run's report directory (no ActionModule here:
loaded by path by plugins/action/dedup_render_sql.py and plugins/action/dedup_write_report.py).

``make_private_dirs(path)``  creates ``path`` and every missing parent 0700 (os.makedirs would give the parents the
                             umask's mode, 0755: the report directory must not be readable by others); safe when
                             several hosts of one run (forks) create the same parents at once;
``write_if_changed(path, text)``  writes ``text`` 0600, atomically (a temporary file renamed over the old one),
                             unless the file holds exactly that already; True when it wrote.
"""

from __future__ import annotations

import os
import tempfile


def make_private_dirs(path: str) -> None:
    """Create ``path`` and every missing parent owner-only (0700). os.makedirs(exist_ok=True) already accepts a
    directory another host of the run (forks) makes meanwhile, at every level; the umask gives the parents it
    creates 0700 too (this worker process runs one task, and gets its umask back)."""
    old = os.umask(0o077)
    try:
        os.makedirs(path, 0o700, exist_ok=True)
    finally:
        os.umask(old)


def write_if_changed(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` (mode 0600, atomically) unless it holds exactly that already."""
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                os.chmod(path, 0o600)
                return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=".dedup-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True
