"""Tests of moebench.suite: TOML suites -> validated Cases (CPU only, no measurement)."""

from __future__ import annotations

import doctest
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import moebench.suite
from moebench import registry
from moebench.presets import PRESETS
from moebench.suite import SuiteError, load_suite, parse_suite, resolve_device
from tests.conftest import tiny_suite_toml

SUITES = Path(__file__).resolve().parent.parent / "suites"

BASE = """
[suite]
device = "cpu"

[grid]
impl = "grouped"
hidden = 64
ffn = 128
num_experts = 4
top_k = 2
batch = 1
seq_len = 4
"""


def with_lines(text: str, **replacements: str) -> str:
    """BASE-like text with `key = ...` lines replaced (value "" drops the line)."""
    lines = []
    for line in text.splitlines():
        key = line.split("=")[0].strip()
        if key in replacements:
            if replacements[key]:
                lines.append(f"{key} = {replacements[key]}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def option_impl() -> Iterator[str]:
    """A throw-away implementation that reads the option `cache_experts`."""
    name = "test-option-impl"
    registry.load_all()
    registry.register(name, family="test", description="test", options=("cache_experts",))(
        lambda weights, case: None
    )
    yield name
    registry.unregister(name)


@pytest.fixture
def float32_impl() -> Iterator[str]:
    """A throw-away implementation that runs only float32."""
    name = "test-float32-only"
    registry.load_all()
    registry.register(name, family="test", description="test", dtypes=("float32",))(
        lambda weights, case: None
    )
    yield name
    registry.unregister(name)


def write(tmp_path: Path, text: str, name: str = "my_suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, device: str | None = None) -> str:
    """The SuiteError message of the suite `text` loaded from a file called my_suite.toml."""
    with pytest.raises(SuiteError) as info:
        load_suite(write(tmp_path, text), device=device)
    message = str(info.value)
    assert "my_suite.toml" in message
    return message


# ----------------------------------------------------------------------------- grids


def test_minimal_suite_defaults() -> None:
    suite = parse_suite(BASE, "suites/tiny.toml")
    assert suite.name == "tiny"
    assert suite.path == "suites/tiny.toml"
    assert suite.device == "cpu"
    assert (suite.timeout_s, suite.budget_ms) == (300.0, 2000.0)
    assert (suite.warmup, suite.min_repeats, suite.max_repeats) == (3, 5, 200)
    assert suite.warmup_ms == 500.0
    (case,) = suite.cases
    assert (case.shape.hidden, case.shape.ffn, case.shape.num_experts, case.shape.top_k) == (
        64,
        128,
        4,
        2,
    )
    assert (case.workload.mode, case.dtype, case.routing, case.seed) == (
        "forward",
        "float32",
        "uniform",
        0,
    )
    assert (case.device, case.preset, case.options) == ("cpu", "", ())


def test_grid_is_the_cartesian_product_with_the_last_key_fastest() -> None:
    text = with_lines(
        BASE,
        impl='["reference", "grouped", "dense"]',
        num_experts="[4, 8]",
        batch="[1, 2, 3]",
        top_k="[1, 2]",
    )
    cases = parse_suite(text).cases
    assert len(cases) == 3 * 2 * 2 * 3
    # written order: impl, ..., num_experts, top_k, batch (batch varies fastest)
    assert [c.workload.batch for c in cases[:4]] == [1, 2, 3, 1]
    assert [c.shape.top_k for c in cases[:6]] == [1, 1, 1, 2, 2, 2]
    assert [c.impl for c in cases[::12]] == ["reference", "grouped", "dense"]


def test_measurement_settings_are_read() -> None:
    text = BASE.replace(
        'device = "cpu"',
        'device = "cpu"\nname = "x"\ndescription = "d"\ntimeout_s = 60\nbudget_ms = 100\n'
        "warmup = 1\nwarmup_ms = 0\nmin_repeats = 2\nmax_repeats = 9",
    )
    suite = parse_suite(text)
    assert (suite.name, suite.description, suite.timeout_s, suite.budget_ms) == (
        "x",
        "d",
        60.0,
        100.0,
    )
    assert (suite.warmup, suite.min_repeats, suite.max_repeats) == (1, 2, 9)
    assert suite.warmup_ms == 0.0


def test_zip_varies_together_and_crosses_the_grid() -> None:
    text = with_lines(BASE, hidden="", ffn="", batch="[1, 2]") + (
        "[[zip]]\nhidden = [64, 128, 256]\nffn = [128, 256, 512]\n"
    )
    cases = parse_suite(text).cases
    assert len(cases) == 2 * 3
    pairs = {(c.shape.hidden, c.shape.ffn) for c in cases}
    assert pairs == {(64, 128), (128, 256), (256, 512)}


def test_two_zips_cross_each_other() -> None:
    text = with_lines(BASE, hidden="", ffn="", batch="", seq_len="") + (
        "[[zip]]\nhidden = [64, 128]\nffn = [128, 256]\n"
        "[[zip]]\nbatch = [1, 2, 4]\nseq_len = [8, 4, 2]\n"
    )
    cases = parse_suite(text).cases
    assert len(cases) == 2 * 3
    assert {c.tokens for c in cases} == {8}


def test_exclude_drops_cases_matching_every_key() -> None:
    text = (
        with_lines(BASE, impl='["reference", "grouped", "dense"]', num_experts="[4, 8]")
        + '[[exclude]]\nimpl = ["dense", "reference"]\nnum_experts = 8\n'
    )
    cases = parse_suite(text).cases
    assert len(cases) == 6 - 2
    assert not [c for c in cases if c.impl != "grouped" and c.shape.num_experts == 8]


def test_include_keeps_cases_matching_any_table() -> None:
    text = with_lines(BASE, impl='["reference", "grouped"]', batch="[1, 4, 16]") + (
        '[[include]]\nimpl = "reference"\n'
        "[[include]]\ntokens = 64\n"  # tokens = batch x seq_len: batch 16
    )
    cases = parse_suite(text).cases
    got = {(c.impl, c.workload.batch) for c in cases}
    assert got == {("reference", 1), ("reference", 4), ("reference", 16), ("grouped", 16)}


def test_exclude_can_remove_invalid_combinations_before_they_are_checked() -> None:
    text = with_lines(BASE, num_experts="[2, 8]", top_k="[1, 4]")
    text += "[[exclude]]\nnum_experts = 2\ntop_k = 4\n"
    assert len(parse_suite(text).cases) == 3


def test_preset_fills_the_shape_and_explicit_keys_override_it() -> None:
    text = with_lines(BASE, hidden="", ffn="", num_experts="", top_k="")
    text += 'preset = ["qwen3-30b-a3b", "deepseek-v3"]\n'
    qwen, deepseek = parse_suite(text).cases
    assert qwen.shape == PRESETS["qwen3-30b-a3b"]
    assert deepseek.shape == PRESETS["deepseek-v3"]
    assert deepseek.shape.shared_experts == 1
    assert (qwen.preset, deepseek.preset) == ("qwen3-30b-a3b", "deepseek-v3")

    override = with_lines(BASE, hidden="", ffn="", num_experts="", top_k="")
    override += 'preset = "mixtral-8x7b"\ntop_k = 1\n'
    (case,) = parse_suite(override).cases
    assert case.shape.top_k == 1
    assert case.shape.hidden == PRESETS["mixtral-8x7b"].hidden == 4096
    assert case.preset == "mixtral-8x7b"


def test_options_are_swept_and_only_given_to_impls_that_declare_them(
    option_impl: str,
) -> None:
    text = with_lines(BASE, impl=f'["grouped", "{option_impl}"]')
    text += "[options]\ncache_experts = [2, 4]\n"
    cases = parse_suite(text).cases
    # grouped declares no options: its two sweep points are one case
    assert [(c.impl, c.options) for c in cases] == [
        ("grouped", ()),
        (option_impl, (("cache_experts", 2),)),
        (option_impl, (("cache_experts", 4),)),
    ]
    assert cases[2].option("cache_experts") == 4
    filtered = parse_suite(text + "[[exclude]]\ncache_experts = 2\n").cases
    assert [c.option("cache_experts") for c in filtered] == [None, 4]


def test_case_ids_are_unique_stable_and_independent_of_order() -> None:
    text = with_lines(BASE, impl='["reference", "grouped"]', batch="[1, 2]", top_k="[1, 2]")
    first = [c.case_id for c in parse_suite(text).cases]
    assert len(set(first)) == len(first) == 8
    assert [c.case_id for c in parse_suite(text).cases] == first
    reordered = with_lines(BASE, impl='["grouped", "reference"]', batch="[2, 1]", top_k="[2, 1]")
    assert {c.case_id for c in parse_suite(reordered).cases} == set(first)
    # the suite's name is not part of a case's identity
    renamed = text.replace('device = "cpu"', 'device = "cpu"\nname = "other"')
    assert [c.case_id for c in parse_suite(renamed).cases] == first


def test_duplicate_cases_are_removed_keeping_the_first() -> None:
    text = with_lines(BASE, batch="[1, 2, 1]", routing='["uniform", "uniform"]')
    cases = parse_suite(text).cases
    assert [c.workload.batch for c in cases] == [1, 2]


def test_device_sections_merge_over_the_top_level_tables() -> None:
    text = with_lines(BASE, batch="") + (
        "[cpu.grid]\nbatch = [1, 2]\n"
        "[cpu.suite]\nbudget_ms = 50\n"
        '[[cpu.exclude]]\nbatch = 2\nimpl = "grouped"\n'
        "[cuda.grid]\nbatch = [1, 64, 4096]\n"
    )
    suite = parse_suite(text)
    assert [c.workload.batch for c in suite.cases] == [1]
    assert suite.budget_ms == 50.0


def test_auto_device_without_cuda_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    suite = parse_suite(BASE.replace('device = "cpu"', 'device = "auto"'))
    assert suite.device == "cpu"
    assert {c.device for c in suite.cases} == {"cpu"}


def test_device_override_replaces_the_suites_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    suite = parse_suite(BASE, device="cuda")
    assert suite.device == "cuda"
    assert {c.device for c in suite.cases} == {"cuda"}


def test_module_docstring_examples_run(option_impl: str) -> None:
    assert doctest.testmod(moebench.suite).failed == 0
    doc = moebench.suite.__doc__ or ""
    example = doc.split("```toml")[1].split("```")[0]
    example = example.replace('"dense"]', f'"dense", "{option_impl}"]', 1)
    suite = parse_suite(example, "example.toml")
    assert suite.name == "smoke" and suite.device == "cpu"
    assert {c.shape.num_experts for c in suite.cases} == {8}  # the [[include]]
    assert "dense" in suite.impls
    assert not [c for c in suite.cases if c.impl == "dense" and c.routing == "zipf:1.2"]
    assert {c.option("cache_experts") for c in suite.cases if c.impl == option_impl} == {2, 4}
    assert {(c.shape.hidden, c.shape.ffn) for c in suite.cases} == {(64, 128), (128, 256)}


# ------------------------------------------------------------------------- shipped suites


def test_smoke_suite_loads() -> None:
    suite = load_suite(SUITES / "smoke.toml")
    assert suite.name == "smoke"
    assert suite.device == "cpu"
    assert 30 <= len(suite.cases) <= 50
    assert {c.impl for c in suite.cases} == {"reference", "grouped", "capacity", "dense"}
    assert {c.routing for c in suite.cases if c.impl != "grouped"} == {"uniform"}
    assert {c.impl for c in suite.cases if c.workload.mode == "train"} == {
        "reference",
        "grouped",
    }
    assert max(c.tokens * c.shape.hidden for c in suite.cases) <= 128 * 64
    assert suite.budget_ms <= 200 and suite.max_repeats <= 20


def test_default_suite_loads_for_cpu() -> None:
    suite = load_suite(SUITES / "default.toml", device="cpu")
    assert suite.device == "cpu"
    assert {c.impl for c in suite.cases} == {"reference", "grouped", "capacity", "dense"}
    assert {c.dtype for c in suite.cases} == {"float32"}
    assert {c.tokens for c in suite.cases} == {16, 256}
    assert 10 <= len(suite.cases) <= 40


def test_default_suite_loads_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    suite = load_suite(SUITES / "default.toml")
    assert suite.device == "cuda"
    assert {c.preset for c in suite.cases} == {"mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"}
    assert {c.dtype for c in suite.cases} == {"bfloat16"}
    forward = [c for c in suite.cases if c.workload.mode == "forward"]
    assert {c.tokens for c in forward} == {1, 64, 4096}
    assert len(forward) == 3 * 3 * 5
    train = [(c.impl, c.preset, c.tokens) for c in suite.cases if c.workload.mode == "train"]
    assert train == [("grouped", "qwen3-30b-a3b", 8192), ("triton", "qwen3-30b-a3b", 8192)]


# ---------------------------------------------------------------------------- bad suites

BAD_SUITES = {
    "unknown grid key": (with_lines(BASE, top_k="") + "topk = 2\n", ["topk", "top_k"]),
    "unknown suite key": (BASE.replace("[suite]", "[suite]\nbudget = 3"), ["budget"]),
    "unknown table": (BASE + "[grdi]\nx = 1\n", ["grdi", "[grid]"]),
    "string for int": (with_lines(BASE, hidden='"big"'), ["hidden", "int", "'big'"]),
    "float for int": (with_lines(BASE, top_k="1.5"), ["top_k", "int", "1.5"]),
    "bool for int": (with_lines(BASE, batch="true"), ["batch", "int", "True"]),
    "bool for number": (BASE + "capacity_factor = false\n", ["capacity_factor", "number"]),
    "top_k > num_experts": (with_lines(BASE, top_k="[2, 8]"), ["top_k", "num_experts=4"]),
    "negative hidden": (with_lines(BASE, hidden="-1"), ["hidden", ">= 1"]),
    "unknown impl": (with_lines(BASE, impl='"groupd"'), ["impl", "groupd", "grouped"]),
    "unknown preset": (BASE + 'preset = "mixtral"\n', ["preset", "mixtral-8x7b"]),
    "bad routing": (BASE + 'routing = "hot:4:0.5"\n', ["routing", "hot:4:0.5", "zipf:S"]),
    "unknown routing": (BASE + 'routing = "pareto"\n', ["routing", "pareto"]),
    "unknown dtype": (BASE + 'dtype = "float8"\n', ["dtype", "float8", "bfloat16"]),
    "unknown mode": (BASE + 'mode = "backward"\n', ["mode", "backward", "train"]),
    "impl without that dtype": (BASE + 'dtype = "float64"\n', ["dtype", "float64", "grouped"]),
    "missing required key": (with_lines(BASE, batch=""), ["batch", "required"]),
    "missing shape key": (with_lines(BASE, ffn=""), ["ffn", "preset"]),
    "zip of unequal lists": (
        with_lines(BASE, hidden="", ffn="") + "[[zip]]\nhidden = [64, 128]\nffn = [128]\n",
        ["hidden", "unequal"],
    ),
    "key in grid and zip": (
        BASE + "[[zip]]\nseq_len = [4, 8]\n",
        ["seq_len", "[grid]", "[[zip]]"],
    ),
    "zip written as a table": (BASE + "[zip]\nseq_len = [4, 8]\n", ["zip", "[[zip]]"]),
    "empty list": (with_lines(BASE, batch="[]"), ["batch", "empty"]),
    "filters remove everything": (
        BASE + '[[exclude]]\nimpl = "grouped"\n',
        ["no cases left", "[[exclude]]"],
    ),
    "unknown filter key": (BASE + '[[exclude]]\nimple = "x"\n', ["imple", "impl"]),
    "option no impl reads": (BASE + "[options]\ncache_experts = 2\n", ["cache_experts"]),
    "option named like a field": (BASE + "[options]\nbatch = 2\n", ["batch", "[grid]"]),
    "device in grid": (BASE + 'device = "cpu"\n', ["device", "[suite]"]),
    "unknown device": (BASE.replace('"cpu"', '"tpu"'), ["device", "tpu", "cuda:N"]),
    "max_repeats < min_repeats": (
        BASE.replace("[suite]", "[suite]\nmin_repeats = 10\nmax_repeats = 2"),
        ["max_repeats", "min_repeats"],
    ),
    "typo in the cuda section": (BASE + "[cuda.gird]\nbatch = 1\n", ["gird", "[cuda.grid]"]),
    "bad filter in the inactive cuda section": (
        BASE + "[[cuda.exclude]]\nbath = 1\n",
        ["[[cuda.exclude]] #1", "bath", "batch"],
    ),
    "bad setting in the inactive cuda section": (
        BASE + "[cuda.suite]\nwarmup = -1\n",
        ["[cuda.suite]", "warmup", ">= 0"],
    ),
    "negative timed warm-up": (
        BASE.replace("[suite]", "[suite]\nwarmup_ms = -5"),
        ["warmup_ms", ">= 0", "-5"],
    ),
    "timed warm-up not a number": (
        BASE.replace("[suite]", '[suite]\nwarmup_ms = "long"'),
        ["warmup_ms", "long"],
    ),
    "requires not a table": (
        BASE.replace("[suite]", '[suite]\nrequires = ["my-plugin"]'),
        ["[suite] key 'requires'", "table of package name = how to install it", "list"],
    ),
    "requires with an empty hint": (
        BASE.replace("[suite]", '[suite]\nrequires = { my-plugin = "" }'),
        ["[suite] key 'requires'", '"pip install ./plugin"'],
    ),
    "bad value in the inactive cuda section": (
        BASE + '[cuda.grid]\npreset = "mixtral"\n',
        ["[cuda.grid]", "preset", "mixtral-8x7b"],
    ),
}


@pytest.mark.parametrize("label", list(BAD_SUITES))
def test_bad_suite_names_file_key_and_what_is_allowed(tmp_path: Path, label: str) -> None:
    text, expected = BAD_SUITES[label]
    message = error_of(tmp_path, text)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_missing_required_package_is_named_in_place_of_its_impls(tmp_path: Path) -> None:
    """[suite] requires: the impls a missing plugin package would register are not listed
    one by one (each with every known impl); the package is, with how to install it. The
    suite's other problems stay."""
    requires = '[suite]\nrequires = { moebench-not-installed = "pip install ./plugin" }'
    text = with_lines(BASE, impl='["grouped", "from-the-plugin"]', batch="1.5")
    message = error_of(tmp_path, text.replace("[suite]", requires))
    lines = message.splitlines()
    assert lines[0].endswith(
        "[suite] requires 'moebench-not-installed', which is not installed here: "
        "pip install ./plugin"
    )
    assert "unknown impl" not in message and "from-the-plugin" not in message
    assert len(lines) == 2 and "'batch'" in lines[1]


def test_requires_is_only_reported_when_an_impl_is_unknown(tmp_path: Path) -> None:
    """A missing package whose impls are all known (registered by a --plugin file, say)
    stops nothing; an installed package leaves unknown impls reported as such."""
    missing = '[suite]\nrequires = { moebench-not-installed = "pip install ./plugin" }'
    assert len(load_suite(write(tmp_path, BASE.replace("[suite]", missing))).cases) == 1
    installed = '[suite]\nrequires = { pytest = "pip install pytest" }'
    text = with_lines(BASE, impl='"from-the-plugin"').replace("[suite]", installed)
    message = error_of(tmp_path, text)
    assert "unknown impl 'from-the-plugin'" in message and "[suite] requires" not in message


def test_all_problems_are_reported_each_on_its_own_line(tmp_path: Path) -> None:
    text = with_lines(BASE, hidden='"big"', top_k="", batch="1.5") + "topk = 1\n"
    with pytest.raises(SuiteError) as info:
        load_suite(write(tmp_path, text))
    problems = info.value.problems
    assert len(problems) == 3
    assert all(line.startswith(str(tmp_path / "my_suite.toml")) for line in problems)
    assert str(info.value).count("\n") == 2


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "[options\nx = 1\n")
    assert "syntax" in message and "line 13" in message


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"nope\.toml"):
        load_suite(tmp_path / "nope.toml")


def test_cuda_without_a_visible_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of(tmp_path, BASE.replace('"cpu"', '"cuda"'))
    assert "device" in message and "no CUDA device is visible" in message
    assert "--device cpu" in message
    override = error_of(tmp_path, BASE, device="cuda:0")
    assert "--device" in override and "no CUDA device is visible" in override


def test_cuda_index_beyond_the_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    assert "cuda:0 .. cuda:1" in error_of(tmp_path, BASE, device="cuda:2")


def test_dtype_the_impl_does_not_support(tmp_path: Path, float32_impl: str) -> None:
    text = with_lines(BASE, impl=f'"{float32_impl}"') + 'dtype = ["float32", "bfloat16"]\n'
    message = error_of(tmp_path, text)
    assert "dtype" in message and "bfloat16" in message and float32_impl in message
    assert "allowed for it: float32" in message
    ok = with_lines(BASE, impl=f'"{float32_impl}"') + 'dtype = "float32"\n'
    assert len(parse_suite(ok).cases) == 1


def test_bfloat16_on_a_cuda_device_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    message = error_of(tmp_path, BASE + 'dtype = "bfloat16"\n', device="cuda")
    assert "dtype" in message and "is_bf16_supported" in message


def test_bfloat16_on_cpu_does_not_probe_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> bool:
        raise AssertionError("torch.cuda probed for a CPU suite")

    monkeypatch.setattr(torch.cuda, "is_available", fail)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fail)
    assert len(parse_suite(BASE + 'dtype = "bfloat16"\n').cases) == 1


def test_unknown_option_error_lists_the_declared_ones(tmp_path: Path, option_impl: str) -> None:
    text = with_lines(BASE, impl=f'["grouped", "{option_impl}"]')
    message = error_of(tmp_path, text + "[options]\ncache_expert = 2\n")
    assert "cache_expert" in message and "allowed: cache_experts" in message


def test_bad_weights_spec_names_the_key(tmp_path):
    path = tmp_path / "bad_weights.toml"
    path.write_text(tiny_suite_toml(weights='"redundant:7"'))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert "bad_weights.toml" in str(info.value) and "'weights'" in str(info.value)


def _stated_counts(path: Path) -> dict[str, int]:
    """The case counts a built-in suite's header comment states: `# CPU  (28 cases; ...`
    or `# CUDA (NCCL, 128 cases ...` on one line."""
    import re

    stated = {}
    for line in path.read_text().splitlines():
        found = re.match(r"#\s*(CPU|CUDA)\s+\((?:[^,;)]+, )?(\d+) cases", line)
        if found:
            stated[found.group(1).lower()] = int(found.group(2))
    return stated


@pytest.mark.parametrize("name", sorted(p.stem for p in SUITES.glob("*.toml")))
def test_the_case_counts_a_suite_states_are_its_own(name: str) -> None:
    """A header comment that says how many cases a device gets says the truth (peers said
    216 on CUDA, before its 32 graphed cases were counted: 248)."""
    from moebench.suite import count_cases

    for device, stated in _stated_counts(SUITES / f"{name}.toml").items():
        assert count_cases(SUITES / f"{name}.toml", device)[0] == stated, (name, device)


def test_a_count_for_a_device_refuses_what_that_device_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`count_cases` (the `moebench suites` table) refuses what `load_suite` would
    refuse on that device, whatever device this machine has, and never asks CUDA: it
    counted the triton suite's 46 CUDA-only cases as runnable on the CPU."""
    import moebench.suite_cases
    from moebench.suite import count_cases

    def no_probe() -> bool:
        raise AssertionError("count_cases asked the CUDA device")

    monkeypatch.setattr(moebench.suite_cases, "_cuda_bf16_supported", no_probe)
    with pytest.raises(SuiteError, match=r"impl 'triton' does not run on device 'cpu'"):
        count_cases(SUITES / "triton.toml", "cpu")
    assert count_cases(SUITES / "triton.toml", "cuda")[0] == 46
    graphed_on_cpu = tmp_path / "graphed.toml"
    graphed_on_cpu.write_text(
        '[suite]\nname = "graphed"\n[grid]\nimpl = "grouped"\nhidden = 8\nffn = 8\n'
        "num_experts = 2\ntop_k = 1\nbatch = 1\nseq_len = 2\ncuda_graph = true\n"
    )
    with pytest.raises(SuiteError, match=r"key 'cuda_graph': needs a CUDA device"):
        count_cases(graphed_on_cpu, "cpu")
    assert count_cases(graphed_on_cpu, "cuda")[0] == 1
