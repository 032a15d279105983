"""One identifier rule (module_utils/dedup_ident.py), two voices: validate_identifier() in the modules and the
pg_ident filter of the SQL templates; plus the other quoting filters of plugins/filter/dedup.py."""

from __future__ import annotations

import pytest
from _load import by_path, module_util
from ansible.errors import AnsibleFilterError

ident = module_util("dedup_ident")
pg = module_util("dedup_pg")
filters = by_path("plugins/filter/dedup.py", "dedup_sql_filters")

LEGAL = ["task_tags", "Task Tags", 'we"ird', "select", "é" * 31, "a" * 63, "x-y", "a*b", "a/b"]
# (name, reason) refused by both
REFUSED = [
    ("", "empty"),
    (None, "empty"),
    (42, "empty"),
    ("a\x00b", "nul"),
    ("x; DROP TABLE t", "sql"),
    ("a--b", "sql"),
    ("a/*b", "sql"),
    ("a*/b", "sql"),
    ("a\nb", "sql"),
    ("a\rb", "sql"),
    ("a" * 64, "long"),
    ("é" * 32, "long"),  # 64 bytes in 32 characters
]


@pytest.mark.parametrize("name", LEGAL)
def test_legal_names_pass_both(name):
    assert ident.identifier_problem(name) is None
    assert pg.validate_identifier(name, "table") == name
    assert filters.pg_ident(name) == '"' + name.replace('"', '""') + '"'


@pytest.mark.parametrize(("name", "reason"), REFUSED)
def test_refused_names_fail_both(name, reason):
    assert ident.identifier_problem(name)[0] == reason
    with pytest.raises(pg.DedupPgError):
        pg.validate_identifier(name, "table")
    with pytest.raises(AnsibleFilterError):
        filters.pg_ident(name)


@pytest.mark.parametrize(("name", "expected"), [
    ("", "table name is empty or not a string: ''"),
    ("a\x00b", "table name 'a\\x00b' contains a NUL byte"),
    ("x; y", "table name 'x; y' looks like SQL (contains ';'): refused; give the plain name of the table as it "
             "appears in the catalog"),
    ("a" * 64, f"table name '{'a' * 64}' is longer than PostgreSQL's 63-byte identifier limit"),
])
def test_module_messages(name, expected):
    with pytest.raises(pg.DedupPgError) as err:
        pg.validate_identifier(name, "table")
    assert str(err.value) == expected


class _Module:
    """What validate_identifier needs of an AnsibleModule: fail_json that ends the module."""

    params: dict = {}

    def fail_json(self, **kw):
        raise SystemExit(kw["msg"])


def test_module_variant_fails_the_module():
    with pytest.raises(SystemExit, match="looks like SQL"):
        pg.validate_identifier("a;b", "column", _Module())


@pytest.mark.parametrize(("name", "expected"), [
    ("", "dedup: empty or non-string column: ''"),
    ("a" * 64, f"dedup: column '{'a' * 64}' is longer than PostgreSQL's 63-byte limit"),
    ("a--b", "dedup: column 'a--b' looks like SQL (contains ; -- /* */ or a control character); refused"),
    ("a\x00b", "dedup: column 'a\\x00b' looks like SQL (contains ; -- /* */ or a control character); refused"),
])
def test_filter_messages(name, expected):
    with pytest.raises(AnsibleFilterError) as err:
        filters.pg_ident(name, "column")
    assert expected in str(err.value)


def test_qident_and_idents():
    assert filters.pg_qident(["breezeway", "task_tags"]) == '"breezeway"."task_tags"'
    assert filters.pg_qident("t") == '"t"'
    assert filters.pg_idents(["a", 'b"c']) == '"a", "b""c"'
    assert filters.pg_idents(["a", "b"], prefix="k") == 'k."a", k."b"'
    with pytest.raises(AnsibleFilterError):
        filters.pg_qident(["s", "t;"])


@pytest.mark.parametrize(("value", "expected"), [
    (None, "NULL"), (True, "true"), (False, "false"), (3, "3"), (2.5, "2.5"),
    ("it's", "'it''s'"), ("back\\slash", "'back\\slash'"), ("", "''"),
])
def test_literal(value, expected):
    assert filters.pg_literal(value) == expected


def test_literal_refuses_nul():
    with pytest.raises(AnsibleFilterError, match="NUL"):
        filters.pg_literal("a\x00b")


def test_pgpass_escape():
    assert filters.pgpass_escape("p:a\\ss") == "p\\:a\\\\ss"


def test_dup_spec_keeps_only_what_pg_duplicates_takes():
    table = {"name": "t", "natural_key": ["a", "b"], "keep": "oldest", "order_by": "created_at"}
    assert filters.dedup_dup_spec(table) == {"name": "t", "natural_key": ["a", "b"]}
    table["ignore_columns"] = ["x"]
    assert filters.dedup_dup_spec(table)["ignore_columns"] == ["x"]


def test_project_root_is_the_checkout():
    from _load import REPO

    assert filters.dedup_project_root() == str(REPO)
    assert set(filters.FilterModule().filters()) >= {"pg_ident", "pg_qident", "pg_idents", "pg_literal"}


def test_constraint_checks_list_every_planned_table_in_order():
    plan = {"tables": [{"schema": "s", "table": "a", "natural_key": ("k",), "keep": "oldest"},
                       {"schema": "t", "table": "b", "natural_key": ["x", "y"]}]}
    assert filters.dedup_constraint_checks(plan) == [{"schema": "s", "table": "a", "columns": ["k"]},
                                                     {"schema": "t", "table": "b", "columns": ["x", "y"]}]
    assert filters.dedup_constraint_checks({}) == [] and filters.dedup_constraint_checks(None) == []
