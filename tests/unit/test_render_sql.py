"""plugins/action/dedup_render_sql.py: file names, owner-only directories, writes only when the text changed."""

from __future__ import annotations

import os

from _load import by_path

render = by_path("plugins/action/dedup_render_sql.py", "dedup_action_render_sql")


def test_file_names_keep_the_order_and_replace_unsafe_characters():
    assert render.file_name(1, "task_requirements") == "01_task_requirements.sql"
    assert render.file_name(12, 'We ird/"T"') == "12_We_ird__T_.sql"


def test_directories_it_creates_are_owner_only(tmp_path):
    target = tmp_path / "reports" / "run" / "lab-db" / "sql"
    render.make_private_dirs(str(target))
    for d in (tmp_path / "reports", target.parent.parent, target.parent, target):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
    render.make_private_dirs(str(target))  # exists: nothing to do


def test_a_file_is_written_only_when_its_text_changes(tmp_path):
    path = str(tmp_path / "01_t.sql")
    assert render.write_if_changed(path, "SELECT 1;\n") is True
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    assert render.write_if_changed(path, "SELECT 1;\n") is False and os.stat(path).st_mode & 0o777 == 0o600
    assert render.write_if_changed(path, "SELECT 2;\n") is True and open(path).read() == "SELECT 2;\n"
    assert sorted(os.listdir(tmp_path)) == ["01_t.sql"], "no temporary file left"
