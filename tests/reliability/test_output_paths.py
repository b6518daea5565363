"""Output paths a careless user gives: ``--overwrite`` replaces only a folder holding a mopeq artifact, never a
folder of other files or the model being read; ``.``, ``/`` and folders given as file names are refused in one
line (exit 2, no traceback) and nothing is touched."""

from __future__ import annotations

import pytest

from .conftest import main, tiny_profile_args, tree_bytes


@pytest.fixture(scope="module")
def plan(tiny_dir, tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    assert main(tiny_profile_args(tiny_dir, out / "profile.json")) == 0
    assert main(["plan", tiny_spec, "--profile", out / "profile.json", "-o", out / "plan.json"]) == 0
    return out / "plan.json"


def refused(capsys, args, *words) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_overwrite_never_deletes_a_users_folder_or_the_model(tiny_dir, plan, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", mine, "--overwrite"], "not a mopeq artifact")
    assert tree_bytes(mine) == {"thesis.tex": b"years of work"}
    model = tree_bytes(tiny_dir)
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", tiny_dir, "--overwrite"], "the model being read")
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", tiny_dir / "sub", "--overwrite"], "the model being read")
    assert tree_bytes(tiny_dir) == model
    (tmp_path / "file").write_text("x")
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", tmp_path / "file", "--overwrite"], "not a folder")
    monkeypatch.chdir(mine)
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", ".", "--overwrite"], "not a mopeq artifact")
    refused(capsys, ["compile", tiny_dir, "--plan", plan, "-o", "/", "--overwrite"], "-o /")
    assert tree_bytes(mine) == {"thesis.tex": b"years of work"}
    # an artifact folder is replaced, and an empty folder is used
    (tmp_path / "empty").mkdir()
    assert main(["compile", tiny_dir, "--plan", plan, "-o", tmp_path / "empty", "--overwrite"]) == 0
    assert main(["compile", tiny_dir, "--plan", plan, "-o", tmp_path / "empty", "--overwrite"]) == 0
    assert (tmp_path / "empty" / "mopeq.json").is_file()


def test_plan_and_profile_to_a_folder_are_refused(tiny_dir, tiny_spec, plan, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["plan", tiny_spec, "--profile", plan.with_name("profile.json"), "-o", "."], "is a folder")
    refused(capsys, tiny_profile_args(tiny_dir, tmp_path), "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
