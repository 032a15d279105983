#!/usr/bin/python
"""Ansible module pg_duplicates: count duplicate rows by natural key, read-only."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_duplicates
short_description: Count duplicate rows per natural key in PostgreSQL tables (read-only)
description:
  - For each table, in one pass (a hash aggregate over the natural key; rows never come into Python),
    counts total rows, distinct natural keys, duplicate rows and groups, the largest group, rows with a
    NULL in the key, and divergent groups (same key, different values in the compared columns).
  - NULLs in a key are grouped the way C(UNIQUE NULLS NOT DISTINCT) groups them (result key C(nulls)).
  - Runs in a READ ONLY transaction; never changes anything, so C(changed) is always false and it
    runs in check mode too.
  - Returns order-independent fingerprints of the set of natural keys and of the primary keys, so a
    deduplication can be proven to have kept every key.
version_added: "1.0.0"
author: dedup-rollout
extends_documentation_fragment: [dedup_pg]
options:
  schema:
    description: Schema of the tables.
    type: str
    default: public
  tables:
    description:
      - The tables to inspect, each a dict with C(name), C(natural_key) (list of columns) and optionally
        C(ignore_columns) (overrides the global list for that table). Other keys (for example
        C(keep), C(order_by) of C(dedup_tables)) are accepted and ignored.
    type: list
    elements: dict
    required: true
  ignore_columns:
    description:
      - Columns left out when deciding whether rows with the same key differ (divergent groups).
      - The primary key columns are always ignored. Names that are not columns of a table are ignored.
    type: list
    elements: str
    default: [id, created_at, updated_at]
  samples:
    description: How many sample keys of each kind (duplicate, divergent, NULL) to return per table.
    type: int
    default: 5
  work_mem:
    description: C(work_mem) set (SET LOCAL) for the read-only transaction, so the hash aggregate stays in memory.
    type: str
    default: 256MB
  fingerprint_ids:
    description:
      - Also fingerprint the primary key of every row (C(id_fingerprint)), which validation compares with the
        migration's fingerprint of the kept rows. Off by default - preflight and monitoring do not need it, and
        it costs a hash of every row.
    type: bool
    default: false
notes:
  - Needs psycopg2 on the target. Supports check mode.
  - Cost per table is one sequential scan; samples come from the materialised aggregate, not from the table.
"""

EXAMPLES = r"""
- name: Count duplicates in the child tables
  pg_duplicates:
    login_host: "{{ dedup_db_host }}"
    login_port: "{{ dedup_db_port }}"
    login_db: "{{ dedup_db_name }}"
    login_user: "{{ dedup_db_user }}"
    login_password: "{{ dedup_db_password }}"
    schema: breezeway
    tables:
      - {name: task_requirements, natural_key: [task_pk, requirement_id]}
      - {name: task_comments, natural_key: [task_pk, comment_id], ignore_columns: [id, created_at, etl_run]}
  register: dedup_counts
  no_log: true

- name: Show the duplicate rows per table
  ansible.builtin.debug:
    msg: "{{ dedup_counts.tables | items2dict(key_name='table', value_name='duplicate_rows') }}"
"""

RETURN = r"""


tables:
  description: One entry per input table, in input order.
  returned: success
  type: list
  elements: dict
  contains:
    table: {description: Table name., type: str, returned: always}
    schema: {description: Schema name., type: str, returned: always}
    natural_key: {description: The key columns., type: list, returned: always}
    total_rows: {description: Rows in the table., type: int, returned: always}
    distinct_keys: {description: Distinct natural keys (NULLs not distinct)., type: int, returned: always}
    duplicate_rows:
      description: total_rows - distinct_keys (the rows a deduplication removes).
      type: int
      returned: always
    duplicate_groups: {description: Keys with more than one row., type: int, returned: always}
    largest_group: {description: Rows of the most repeated key (0 on an empty table)., type: int, returned: always}
    null_key_rows: {description: Rows with at least one NULL key column., type: int, returned: always}
    null_key_columns: {description: "Per key column: rows where it is NULL.", type: dict, returned: always}
    divergent_groups: {description: Keys whose rows differ in the compared columns., type: int, returned: always}
    divergent_rows: {description: Rows in divergent groups., type: int, returned: always}
    compared_columns: {description: Columns compared for divergence., type: list, returned: always}
    sample_duplicate_keys:
      description: Up to C(samples) duplicated keys, each a dict column -> value as text.
      type: list
      returned: always
    sample_divergent_keys: {description: Up to C(samples) divergent keys., type: list, returned: always}
    sample_null_keys: {description: Up to C(samples) keys with a NULL column., type: list, returned: always}
    divergent_columns:
      description:
        - The compared columns whose values actually differ within at least one of the C(sample_divergent_keys)
          (NULL counts as a value), in table order. Empty when there is no divergent key (or C(samples=0)).
        - Read by one extra query per table with divergent keys, restricted to the sample keys.
      type: list
      elements: str
      returned: always
    divergent_sample:
      description:
        - One entry per sample divergent key, C(key) (column -> value as text) and C(values) (for each column
          that differs within that key, up to 3 of its distinct values as text, NULL as null; a value longer
          than 60 characters is cut to 50 and followed by C(... (md5 xxxxxxxx))).
      type: list
      elements: dict
      returned: always
    key_fingerprint:
      description: Order-independent fingerprint of the set of distinct keys (a number as a string).
      type: str
      returned: always
    id_fingerprint:
      description:
        - Same over the primary key of every row; over the whole row when the table has no primary key.
        - C(null) unless C(fingerprint_ids).
      type: str
      returned: always
    nulls: {description: Always C(not distinct)., type: str, returned: always}
    seconds: {description: Time spent on the table., type: float, returned: always}
totals:
  description: Sums over all tables of the counters above, plus C(tables) and C(seconds).
  returned: success
  type: dict
nulls:
  description: How NULL key values are grouped, always C(not distinct) (as C(UNIQUE NULLS NOT DISTINCT) would).
  returned: success
  type: str
  sample: not distinct
changed:
  description: Always false.
  returned: always
  type: bool
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.dedup_pg import (
    check_columns,
    connect,
    error_text,
    get_table,
    pg_common_argument_spec,
    qualified,
    sql,
    validate_identifier,
)

COUNTERS = ("total_rows", "distinct_keys", "duplicate_rows", "duplicate_groups", "null_key_rows",
            "divergent_groups", "divergent_rows")


def _row_hash(columns):
    """One 64-bit hash of the compared columns' text, without building ROW(...)::text.

    Each column's text is hashed with its own seed (its position), a NULL maps to that position, and the
    per-column hashes are XORed: two rows get the same hash exactly when every compared column has the
    same text (or both NULL), up to 64-bit collisions. That is the equality ROW(cols)::text compared
    before, at a fraction of the cost (record_out was most of the module's time). 0 when nothing is compared.
    """
    if not columns:
        return sql.SQL("0::bigint")
    return sql.SQL(" # ").join(
        sql.SQL("coalesce(hashtextextended({c}::text, {i}), {i})").format(c=sql.Identifier(c), i=sql.Literal(i))
        for i, c in enumerate(columns, start=1)
    )


def _key_json(key):
    return sql.SQL("json_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}::text").format(sql.Literal(c), sql.Identifier(c)) for c in key
    ))


def build_query(schema, table, key, compared, pk, samples, fingerprint_ids=True):
    """The single-pass statement: aggregate per key once (materialised), then summarise that.

    The per-row hashes are computed once, in the innermost subquery (min and max of one expression would
    evaluate it twice). The id fingerprint is a sum of bigints (int128 accumulation, returned as numeric):
    the same value as summing them as numeric, which the migration's keep_fingerprint does
    (sql/migrate_table.sql.j2), without a numeric addition per row.
    """
    keys = sql.SQL(", ").join(map(sql.Identifier, key))
    any_null = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in key)
    # Without a primary key the kept rows are fingerprinted whole (as the migration records them).
    id_hash = (sql.SQL("hashtextextended(ROW({})::text, 0)").format(
        sql.SQL(", ").join(map(sql.Identifier, pk))) if pk else sql.SQL("hashtextextended(ROW(dedup_t.*)::text, 0)"))
    id_sum = sql.SQL("sum(dedup_i)")
    if not fingerprint_ids:  # neither hashed nor summed
        id_hash, id_sum = sql.SQL("NULL::bigint"), sql.SQL("NULL::numeric")
    null_cols = sql.SQL(", ").join(
        sql.SQL("coalesce(sum(n) FILTER (WHERE {} IS NULL), 0)").format(sql.Identifier(c)) for c in key
    )
    sample = sql.SQL(
        "(SELECT coalesce(json_agg(s.k), '[]'::json) FROM "
        "(SELECT {kj} AS k FROM g WHERE {cond} ORDER BY n DESC LIMIT {lim}) s)"
    )
    lim = sql.Literal(samples)
    kj = _key_json(key)
    return sql.SQL(
        "WITH g AS MATERIALIZED ("
        " SELECT {keys}, count(*) AS n, min(dedup_h) AS hmin, max(dedup_h) AS hmax, {id_sum} AS idsum"
        " FROM (SELECT {keys}, {h} AS dedup_h, {id_hash} AS dedup_i FROM {tbl} dedup_t) dedup_r GROUP BY {keys}) "
        "SELECT coalesce(sum(n), 0), count(*), count(*) FILTER (WHERE n > 1), coalesce(max(n), 0), "
        "coalesce(sum(n) FILTER (WHERE {any_null}), 0), "
        "count(*) FILTER (WHERE hmin <> hmax), coalesce(sum(n) FILTER (WHERE hmin <> hmax), 0), "
        "coalesce(sum(hashtextextended(ROW({keys})::text, 0)::numeric), 0)::text, "
        "coalesce(sum(idsum), 0)::text, "
        "{s_dup}, {s_div}, {s_null}, ARRAY[{null_cols}]::bigint[] "
        "FROM g"
    ).format(
        keys=keys, h=_row_hash(compared), id_hash=id_hash, id_sum=id_sum, tbl=qualified(schema, table),
        any_null=any_null,
        null_cols=null_cols,
        s_dup=sample.format(kj=kj, cond=sql.SQL("n > 1"), lim=lim),
        s_div=sample.format(kj=kj, cond=sql.SQL("hmin <> hmax"), lim=lim),
        s_null=sample.format(kj=kj, cond=any_null, lim=lim),
    )


SAMPLE_VALUES = 3
VALUE_CHARS = 60


def _shown_value(column):
    """A column's text for a sample, cut when long: distinct long values stay distinct (md5 of the whole text)."""
    txt = sql.SQL("{}::text").format(sql.Identifier(column))
    return sql.SQL(
        "CASE WHEN length({t}) > {n} THEN left({t}, {k}) || '... (md5 ' || left(md5({t}), 8) || ')' ELSE {t} END"
    ).format(t=txt, n=sql.Literal(VALUE_CHARS), k=sql.Literal(VALUE_CHARS - 10))


def build_divergent_query(schema, table, key, compared, sample_keys):
    """For the sample divergent keys only: per key, which compared columns differ and some of their values.

    The keys are compared as literals (untyped, so they take the column's type: an index on the key serves),
    a NULL key column as IS NULL. A column differs when it has more than one distinct text, NULL counting
    as one value of its own.
    """
    def match(k):
        return sql.SQL("({})").format(sql.SQL(" AND ").join(
            sql.SQL("{} IS NULL").format(sql.Identifier(c)) if k.get(c) is None
            else sql.SQL("{} = {}").format(sql.Identifier(c), sql.Literal(str(k[c]))) for c in key))

    differs = sql.SQL(", ").join(
        sql.SQL("count(DISTINCT {c}::text) + max(CASE WHEN {c} IS NULL THEN 1 ELSE 0 END) > 1").format(
            c=sql.Identifier(c)) for c in compared)
    values = sql.SQL(", ").join(
        sql.SQL("(array_agg(DISTINCT {v}))[1:{n}]").format(v=_shown_value(c), n=sql.Literal(SAMPLE_VALUES))
        for c in compared)
    return sql.SQL(
        "SELECT {kj}, {differs}, {values} "
        "FROM {tbl} WHERE {where} GROUP BY {keys}"
    ).format(kj=_key_json(key), differs=differs, values=values, tbl=qualified(schema, table),
             where=sql.SQL(" OR ").join(match(k) for k in sample_keys),
             keys=sql.SQL(", ").join(map(sql.Identifier, key)))


def divergent_detail(cur, schema, table, key, compared, sample_keys):
    """(divergent_columns, divergent_sample) for the sample divergent keys; ([], []) when there are none."""
    if not sample_keys or not compared:
        return [], []
    cur.execute(build_divergent_query(schema, table, key, compared, sample_keys))
    found = {}
    n = len(compared)
    for row in cur.fetchall():  # key, one flag per compared column, then one array of values per column
        kj = row[0]
        found[tuple(kj.get(c) for c in key)] = (kj, row[1:1 + n], row[1 + n:])
    columns, sample = set(), []
    for k in sample_keys:  # in the sample's order (largest groups first)
        hit = found.get(tuple(k.get(c) for c in key))
        if hit is None:
            continue
        kj, flags, values = hit
        diff = {c: list(v)[:SAMPLE_VALUES] for c, f, v in zip(compared, flags, values) if f}
        columns.update(diff)
        sample.append({"key": kj, "values": diff})
    return [c for c in compared if c in columns], sample


def normalise_tables(module):
    out = []
    for i, entry in enumerate(module.params["tables"]):
        if not isinstance(entry, dict) or not entry.get("name"):
            module.fail_json(msg=f"tables[{i}] needs a name (got {entry!r})")
        key = entry.get("natural_key")
        if isinstance(key, str):
            key = [key]
        if not key or not isinstance(key, list):
            module.fail_json(msg=f"tables[{i}] ({entry['name']}) needs natural_key: a non-empty list of columns")
        ignore = entry.get("ignore_columns")
        if ignore is None:
            ignore = module.params["ignore_columns"]
        out.append({"name": str(entry["name"]), "natural_key": [str(c) for c in key],
                    "ignore_columns": [str(c) for c in ignore]})
    return out


def main():
    argument_spec = pg_common_argument_spec()
    argument_spec.update(
        schema=dict(type="str", default="public"),
        tables=dict(type="list", elements="dict", required=True),
        ignore_columns=dict(type="list", elements="str", default=["id", "created_at", "updated_at"]),
        samples=dict(type="int", default=5),
        work_mem=dict(type="str", default="256MB"),
        fingerprint_ids=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    schema = validate_identifier(module.params["schema"], "schema", module)
    tables = normalise_tables(module)
    if module.params["samples"] < 0:
        module.fail_json(msg="samples must be >= 0")
    for t in tables:
        validate_identifier(t["name"], "table", module)
        for c in t["natural_key"]:
            validate_identifier(c, "column", module)

    conn = connect(module, autocommit=False, application_name="pg_duplicates", readonly=True)
    results = []
    try:
        cur = conn.cursor()
        try:
            cur.execute("SELECT set_config('work_mem', %s, true)", (module.params["work_mem"],))
        except Exception as exc:
            module.fail_json(msg="invalid work_mem {!r}: {}".format(module.params["work_mem"], error_text(exc, module)))
        plans = []
        for t in tables:  # validate everything before counting anything
            info = get_table(cur, schema, t["name"], module)
            key = check_columns(info, t["natural_key"], module, what="natural key column")
            skip = set(t["ignore_columns"]) | set(info["primary_key"]) | set(key)
            compared = [c for c in info["column_names"] if c not in skip]
            if info["inherited_by"]:
                module.warn(f'"{schema}"."{t["name"]}" has inheritance children ({", ".join(info["inherited_by"])}): '
                            "its counts include their rows")
            plans.append((t, info, key, compared))
        for t, info, key, compared in plans:
            start = time.monotonic()
            query = build_query(schema, t["name"], key, compared, info["primary_key"], module.params["samples"],
                                fingerprint_ids=module.params["fingerprint_ids"])
            try:
                cur.execute(query)
            except Exception as exc:
                err = error_text(exc, module)
                module.fail_json(msg=f'counting duplicates in "{schema}"."{t["name"]}" failed: {err}')
            (total, distinct, groups, largest, null_rows, div_groups, div_rows, key_fp, id_fp,
             s_dup, s_div, s_null, null_cols) = cur.fetchone()
            try:
                div_columns, div_sample = divergent_detail(cur, schema, t["name"], key, compared, s_div)
            except Exception as exc:
                err = error_text(exc, module)
                module.fail_json(msg=f'reading divergent columns of "{schema}"."{t["name"]}" failed: {err}')
            results.append({
                "table": t["name"],
                "schema": schema,
                "natural_key": key,
                "total_rows": int(total),
                "distinct_keys": int(distinct),
                "duplicate_rows": int(total) - int(distinct),
                "duplicate_groups": int(groups),
                "largest_group": int(largest),
                "null_key_rows": int(null_rows),
                "null_key_columns": {c: int(n) for c, n in zip(key, null_cols)},
                "divergent_groups": int(div_groups),
                "divergent_rows": int(div_rows),
                "compared_columns": compared,
                "ignored_columns": [c for c in info["column_names"] if c not in compared and c not in key],
                "sample_duplicate_keys": s_dup,
                "sample_divergent_keys": s_div,
                "sample_null_keys": s_null,
                "divergent_columns": div_columns,
                "divergent_sample": div_sample,
                "key_fingerprint": key_fp,
                "id_fingerprint": id_fp if module.params["fingerprint_ids"] else None,
                "primary_key": info["primary_key"],
                "partitioned": info["partitioned"],
                "inherited_by": info["inherited_by"],
                "referenced_by": [r["table"] for r in info["referenced_by"]],
                "nulls": "not distinct",
                "seconds": round(time.monotonic() - start, 3),
            })
        conn.rollback()
    finally:
        conn.close()

    totals = {k: sum(r[k] for r in results) for k in COUNTERS}
    totals["tables"] = len(results)
    totals["largest_group"] = max([r["largest_group"] for r in results] or [0])
    totals["seconds"] = round(sum(r["seconds"] for r in results), 3)
    module.exit_json(changed=False, tables=results, totals=totals, nulls="not distinct")


if __name__ == "__main__":
    main()
