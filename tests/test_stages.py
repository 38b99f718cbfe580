"""Stages chained by content: what re-runs after a change, a copy, a move, a damaged file."""
import shutil

import pytest

from monoscope.errors import MonoscopeError
from monoscope.stages import Run


def _chain(out, a_setting=1, b_setting=1, ran=None, log=None):
    """Three stages a → b → c; ``ran`` collects the names of the bodies that ran."""
    ran = [] if ran is None else ran
    run = Run(out, log=(log or (lambda m: None)))

    def body_a(folder):
        ran.append("a")
        (folder / "x.txt").write_text(f"a{a_setting}")
        return {"x": folder / "x.txt", "n": a_setting}

    def body_b(folder):
        ran.append("b")
        (folder / "y.txt").write_text(a.data["x"].read_text() + f"+b{b_setting}")
        return {"y": folder / "y.txt"}

    def body_c(folder):
        ran.append("c")
        (folder / "z.txt").write_text(b.data["y"].read_text() + "+c")
        return {"z": folder / "z.txt"}

    a = run.stage("a", {"s": a_setting}, [], body_a)
    b = run.stage("b", {"s": b_setting}, [a], body_b)
    c = run.stage("c", {}, [b], body_c)
    return run, ran, c


def test_change_reruns_exactly_downstream(tmp_path):
    _, ran, _ = _chain(tmp_path)
    assert ran == ["a", "b", "c"]
    _, ran, _ = _chain(tmp_path)
    assert ran == []
    _, ran, c = _chain(tmp_path, b_setting=2)
    assert ran == ["b", "c"] and c.data["z"].read_text() == "a1+b2+c"
    _, ran, c = _chain(tmp_path, a_setting=3, b_setting=2)
    assert ran == ["a", "b", "c"] and c.data["z"].read_text() == "a3+b2+c"


def test_same_content_stops_the_chain(tmp_path):
    """A re-run upstream stage whose files come out the same leaves downstream stages alone."""
    _chain(tmp_path)
    (tmp_path / "a" / "stage.json").write_text("{not json")  # forces a to run again
    logs = []
    _, ran, _ = _chain(tmp_path, log=logs.append)
    assert ran == ["a"] and any("unreadable" in m for m in logs)


def test_copied_and_moved_run_folders_use_their_own_files(tmp_path):
    _chain(tmp_path / "A")
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    (tmp_path / "A" / "c" / "z.txt").write_text("tampered")  # same size would hide; the copy must not read A
    _, ran, c = _chain(tmp_path / "B")
    assert ran == [] and c.data["z"] == tmp_path / "B" / "c" / "z.txt"
    shutil.move(tmp_path / "B", tmp_path / "C")
    _, ran, c = _chain(tmp_path / "C")
    assert ran == [] and c.data["z"].read_text() == "a1+b1+c"
    assert str(tmp_path / "A") not in (tmp_path / "C" / "c" / "stage.json").read_text()


def test_missing_or_resized_file_reruns_the_stage(tmp_path):
    _chain(tmp_path)
    (tmp_path / "b" / "y.txt").unlink()
    logs = []
    _, ran, _ = _chain(tmp_path, log=logs.append)
    assert ran == ["b"] and any("y.txt is missing" in m for m in logs)
    (tmp_path / "a" / "x.txt").write_text("longer than before")
    _, ran, _ = _chain(tmp_path)
    assert ran == ["a"]  # same content written again: b and c keep theirs


def test_new_key_starts_from_an_empty_folder(tmp_path):
    _chain(tmp_path)
    (tmp_path / "b" / "stale.jsonl").write_text("old explanations")
    _chain(tmp_path, b_setting=5)
    assert not (tmp_path / "b" / "stale.jsonl").exists()


def test_running_and_incomplete_stages_resume_in_place(tmp_path):
    run = Run(tmp_path, log=lambda m: None)
    calls = []

    def body(folder):
        calls.append(sorted(p.name for p in folder.iterdir()))
        (folder / "part.txt").write_text("done so far")
        return {"incomplete": len(calls) < 2}
    first = run.stage("s", {}, [], body)
    assert not first.complete
    second = run.stage("s", {}, [], body)
    assert second.complete and "part.txt" in calls[1]
    run.stage("s", {}, [], body)
    assert len(calls) == 2


def test_stage_may_not_write_outside_the_run(tmp_path):
    run = Run(tmp_path / "r", log=lambda m: None)
    with pytest.raises(ValueError):
        run.stage("s", {}, [], lambda folder: {"p": tmp_path / "elsewhere"})


def test_finished_reads_a_stage_or_names_the_fix(tmp_path):
    _chain(tmp_path)
    assert Run(tmp_path).finished("c").data["z"].read_text() == "a1+b1+c"
    with pytest.raises(MonoscopeError, match="no finished 'd' stage"):
        Run(tmp_path).finished("d")
