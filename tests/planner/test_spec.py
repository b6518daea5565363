import pytest

from mopeq.planner import load_spec, parse_bytes
from mopeq.planner.spec import Spec
from mopeq.schemas import InputError


@pytest.mark.parametrize("text,value", [("3.5 GB", 3_500_000_000), ("900MiB", 900 * 2**20), ("12kB", 12_000),
                                        ("1 GiB", 2**30), ("100", 100), (4096, 4096), ("2e3 B", 2000), (1e9, 10**9),
                                        ("8G", 8 * 2**30), ("1500M", 1500 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["abc", "3.5 Gb", "-1 GB", "", True, 0, 1.5, "12 XB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_examples_load():
    for name in ("demo", "demo-layer", "vllm", "demo-pareto"):
        spec = load_spec(f"specs/{name}.yaml")
        assert spec.budget.avg_bits is not None
    assert [b.avg_bits for b in load_spec("specs/demo-pareto.yaml").sweep.budgets()] == [2.25, 2.5, 2.75, 3.0]


def test_schema_is_current():
    import json
    assert json.load(open("specs/schema.json")) == json.loads(json.dumps(Spec.model_json_schema()))


BASE = "version: 1\nbits: [2, 3, 4]\nbudget:\n  avg_bits: 2.5\n"
ERRORS = [
    (BASE.replace("2.5", "abc"), 4, "budget.avg_bits: got 'abc', expected a number"),
    (BASE.replace("2.5", "-1"), 4, "budget.avg_bits"),
    (BASE + "colour: red\n", 5, "colour: unknown field"),
    (BASE.replace("[2, 3, 4]", "[2, 5]"), 2, "bits.1"),
    (BASE.replace("[2, 3, 4]", "[2, 2]"), 2, "bits: got [2, 2], duplicate widths"),
    (BASE.replace("version: 1", "version: 2"), 1, "version"),
    ("version: 1\nbudget:\n  avg_bits: 2.5\n  bytes: 3GB\n", 3, "budget: give exactly one"),
    ("version: 1\nbits: [2]\n", 1, "budget: missing required field"),
    (BASE + "budget2: 1\n", 5, "budget2: unknown field"),
    (BASE.replace("avg_bits: 2.5", "bytes: 3 parsecs"), 4, "budget.bytes"),
    (BASE.replace("avg_bits: 2.5", "fraction: 1.5"), 4, "budget.fraction"),
    (BASE + "scope: planet\n", 5, "scope: got 'planet'"),
    (BASE + "sensitivity: vibes\n", 5, "sensitivity: got 'vibes'"),
    (BASE + "target: tgi\n", 5, "target"),
    (BASE + "group_size: big\n", 5, "group_size: got 'big', expected an integer"),
    (BASE + "symmetric: maybe\n", 5, "symmetric: got 'maybe', expected true or false"),
    (BASE + "pins:\n  - match: 'L*.S*'\n    bits: 5\n", 7, "pins.0.bits"),
    (BASE + "pins:\n  - match: 'L*.S*'\n", 6, "pins.0: give bits"),
    (BASE + "pins:\n  - match: 'L*.S*'\n    bits: 4\n    min_bits: 2\n", 6, "pins.0: give either"),
    (BASE + "pins:\n  - match: 'x'\n    min_bits: 4\n    max_bits: 3\n", 6, "min_bits 4 > max_bits 3"),
    (BASE + "pins:\n  - match: 'x'\n    bits: 8\n", 1, "pins.0 allows none"),
    (BASE + "clusters:\n  per_layer: 0\n", 6, "clusters.per_layer"),
    (BASE + "clusters:\n  method: spectral\n", 6, "clusters.method"),
    (BASE + "layer_budgets:\n  1: {avg_bits: 3}\n", 1, "layer_budgets needs scope: layer"),
    (BASE + "scope: layer\nlayer_budgets:\n  x: {avg_bits: 3}\n", 7, "layer_budgets.x"),
    (BASE + "target: vllm\n", 1, "target vllm: bits must be a subset"),
    (BASE.replace("[2, 3, 4]", "[4, 8]") + "target: vllm\nsymmetric: false\n", 1, "needs symmetric"),
    (BASE + "sweep:\n  avg_bits: {start: 2, stop: 3, num: 1}\n", 6, "sweep.avg_bits.num"),
    (BASE + "sweep:\n  avg_bits: [2, oops]\n", 6, "sweep.avg_bits.1"),
    (BASE + "sweep: {}\n", 5, "sweep: give exactly one"),
    (BASE + "solver:\n  time_limit_s: 0\n", 6, "solver.time_limit_s"),
    ("version: 1\nbudget: [\n", 3, "not valid YAML"),
    ("- 1\n- 2\n", 1, "expected a mapping"),
]


@pytest.mark.parametrize("text,line,message", ERRORS)
def test_errors_name_path_and_line(tmp_path, text, line, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_spec(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text, text


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_yaml_alias_bomb_is_refused_in_a_short_line(tmp_path):
    """Anchors nested 9 deep (9^10 leaves from 600 bytes) as a field value: the error shows a few items."""
    lines = ["version: 1", "bits: [2, 3, 4]", "budget: {avg_bits: 2.5}", "sensitivity:",
             "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}:5: sensitivity: got [") and len(message) < 400 and "\n" not in message


def test_spec_and_max_memory_read_sizes_alike():
    """One parser: "8GB" is 8e9 bytes in a spec and for --max-memory, "8G" and "8GiB" 8 x 2^30 in both."""
    from mopeq.profiler.stream import parse_memory

    for text in ("8GB", "8G", "8GiB", "1500M", "512 MB", "4096"):
        assert parse_memory(text) == parse_bytes(text)
    assert parse_memory("8GB") == 8 * 10**9 and parse_memory("8G") == 8 * 2**30
    with pytest.raises(InputError, match="--max-memory: got 'lots'"):
        parse_memory("lots")
