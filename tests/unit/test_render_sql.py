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


def test_hosts_of_one_run_may_create_the_same_parents_at_once(tmp_path):
    # deploy_dedup.yml renders every region's SQL at once (forks): four hosts create reports/<env>/<run>/ together.
    # One of them used to fail with "[Errno 17] File exists" and its region stopped before its migration.
    import threading

    for attempt in range(30):
        root = tmp_path / str(attempt)
        start, errors = threading.Barrier(8), []

        def make(host, root=root, start=start, errors=errors):
            start.wait()
            try:
                render.make_private_dirs(str(root / "reports" / "env" / "run" / host / "sql"))
            except OSError as exc:  # pragma: no cover - the failure this test is about
                errors.append(exc)

        threads = [threading.Thread(target=make, args=(f"db-{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all((root / "reports" / "env" / "run" / f"db-{i}" / "sql").is_dir() for i in range(8))
        assert os.stat(root / "reports").st_mode & 0o777 == 0o700


def test_a_path_that_is_a_file_is_still_refused(tmp_path):
    (tmp_path / "reports").write_text("not a directory")
    try:
        render.make_private_dirs(str(tmp_path / "reports" / "run"))
    except OSError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a file in the way must not be taken for a directory")


def test_a_file_is_written_only_when_its_text_changes(tmp_path):
    path = str(tmp_path / "01_t.sql")
    assert render.write_if_changed(path, "SELECT 1;\n") is True
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    assert render.write_if_changed(path, "SELECT 1;\n") is False and os.stat(path).st_mode & 0o777 == 0o600
    assert render.write_if_changed(path, "SELECT 2;\n") is True and open(path).read() == "SELECT 2;\n"
    assert sorted(os.listdir(tmp_path)) == ["01_t.sql"], "no temporary file left"
