"""The one rule for what dedup-rollout accepts as a PostgreSQL identifier (schema, table, column, constraint).

Pure Python, no psycopg2: used by the modules through ``module_utils/dedup_pg.py``'s ``validate_identifier()``
and on the controller by the ``pg_ident`` filter (``plugins/filter/dedup.py`` loads this file by its path:
the controller cannot import the project's module_utils as ``ansible.module_utils.*``).

Refused: a non-string or empty name, a NUL byte, anything that looks like SQL (``;``, ``--``, ``/*``, ``*/``,
a newline or carriage return) and names over PostgreSQL's 63-byte limit. Quotes, spaces, upper case and
reserved words are legal: every identifier is quoted where it is used.
"""

from __future__ import annotations

MAX_IDENTIFIER_BYTES = 63
SQL_LOOKING = (";", "--", "/*", "*/", "\n", "\r")


def identifier_problem(name):
    """None when ``name`` is acceptable, else ``(reason, detail)``: ``("empty", None)``, ``("nul", None)``,
    ``("sql", token)`` (the first SQL-looking token found) or ``("long", bytes)``. Checked in that order."""
    if not isinstance(name, str) or name == "":
        return "empty", None
    if "\x00" in name:
        return "nul", None
    for token in SQL_LOOKING:
        if token in name:
            return "sql", token
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        return "long", size
    return None
