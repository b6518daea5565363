"""mopeq's own files are strict JSON both ways: NaN/Infinity and duplicate keys are refused when read (one line,
exit 2), never written; a profile listing an expert twice is refused instead of silently merged."""

from __future__ import annotations

import json

import pytest

from .conftest import main, tiny_profile_args
from mopeq.schemas import InputError, read_plan, read_profile


@pytest.fixture(scope="module")
def files(tiny_dir, tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("strict")
    assert main(tiny_profile_args(tiny_dir, out / "profile.json")) == 0
    assert main(["plan", tiny_spec, "--profile", out / "profile.json", "-o", out / "plan.json"]) == 0
    return out


def test_nan_and_duplicate_keys_in_a_plan_are_refused(files, tmp_path, tiny_dir, capsys):
    text = (files / "plan.json").read_text()
    raw = json.loads(text)
    bad_nan = tmp_path / "nan.json"
    bad_nan.write_text(text.replace(f'"avg_bits": {json.dumps(raw["totals"]["avg_bits"])}', '"avg_bits": NaN', 1))
    assert "NaN" in bad_nan.read_text()
    with pytest.raises(InputError, match="NaN is not a JSON number"):
        read_plan(bad_nan)
    dup = tmp_path / "dup.json"
    dup.write_text(text.replace('{\n', '{\n "version": 99,\n', 1))
    assert dup.read_text().startswith('{\n "version": 99,')
    with pytest.raises(InputError, match="duplicate key 'version'"):
        read_plan(dup)
    capsys.readouterr()
    assert main(["compile", tiny_dir, "--plan", bad_nan, "-o", tmp_path / "art"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "art").exists()


def test_a_profile_listing_an_expert_twice_is_refused(files, tmp_path):
    raw = json.loads((files / "profile.json").read_text())
    raw["nodes"].append(dict(raw["nodes"][0]))
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=f"expert {raw['nodes'][0]['id']} listed twice"):
        read_profile(path)


def test_non_finite_values_are_never_written(tmp_path):
    from mopeq.schemas import _atomic_write_json

    with pytest.raises(InputError, match="NaN or infinite; nothing written"):
        _atomic_write_json(tmp_path / "x.json", {"a": float("inf")})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_no_temporary_file(files, tmp_path, tiny_spec, monkeypatch, capsys):
    """The plan write fails half-way (ENOSPC): exit 2 in one line, no `.plan.json.tmp`, an earlier plan intact."""
    import errno
    from pathlib import Path

    out = tmp_path / "plan.json"
    out.write_text("earlier plan")
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    capsys.readouterr()
    assert main(["plan", tiny_spec, "--profile", files / "profile.json", "-o", out]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"] and out.read_text() == "earlier plan"
