"""TOML suites -> a validated, ordered list of `Case`s (grid, zip, filters, presets).

A suite file says what to measure; `load_suite` turns it into a `Suite` whose `cases`
are frozen `Case`s, or raises `SuiteError` before anything runs. Every problem is
reported as `FILE: [TABLE] key 'KEY': what is wrong; allowed: ...`, one line each (all
problems found are listed, not just the first). Parsing reads the file and nothing else
(no network, no environment); the only probe of the machine is `torch.cuda` when the
resolved device is CUDA (or "auto").

A full example (every table and key is optional except those marked required; the
option `cache_experts` stands for a knob that some plugin implementation declares):

```toml
[suite]
name = "smoke"                # default: the file's stem
description = "tiny shapes"   # default: ""
requires = { my-plugin = "pip install ./plugin" }   # packages whose implementations the
                              #  suite runs, each with how to install it: one of them
                              #  missing is named in place of the impls it would register
device = "cpu"                # "cpu" | "cuda" | "cuda:N" | "auto" (default "auto":
                              #  "cuda" if torch.cuda.is_available() else "cpu");
                              #  load_suite(device=...) / --device overrides it
timeout_s = 60                # per-case timeout (default 300)
budget_ms = 200               # per-case timing budget (default 2000)
warmup = 2                    # warm-up calls (default 3)
warmup_ms = 500               # CUDA: then calls back to back until this many ms have
                              #  passed (default 500; 0 = the calls alone), so every
                              #  sample runs at the clock the card keeps under its power
                              #  cap (measure/timing.py)
min_repeats = 3               # default 5
max_repeats = 50              # default 200; must be >= min_repeats

[grid]                        # cartesian product; each value a scalar or a non-empty list
impl = ["reference", "grouped", "capacity", "dense"]    # required (here or in a [[zip]])
preset = "mixtral-8x7b"       # a moebench.presets.PRESETS name ("" = none): fills the
                              #  shape and router convention; explicit keys override them
num_experts = [4, 8]          # hidden, ffn, num_experts, top_k: required without a preset
top_k = [1, 2]
shared_experts = 0            # default 0
capacity_factor = 1.25        # default 1.25 (int or float)
activation = "swiglu"         # default "swiglu" (the only one)
scoring = "softmax"           # router convention (LayerShape; defaults: the base router):
norm_topk_prob = true         #  "softmax"|"sigmoid", renormalise the top-k gates,
n_groups = 1                  #  group-limited selection (topk_groups of n_groups; 0 =
topk_groups = 0               #  all), the correction bias in the selection, gate
correction_bias = false       #  scaling, "none"|"sigmoid" gate on the shared experts
routed_scaling = 1.0
shared_expert_gate = "none"
batch = [1, 4]                # required
seq_len = 16                  # required
mode = ["forward", "train"]   # default "forward"
dtype = ["float32", "bfloat16"]                  # default "float32"
routing = ["uniform", "zipf:1.2", "hot:2:0.5"]   # default "uniform"
seed = 0                      # default 0
world_size = 1                # default 1
cuda_graph = false            # default false: time replays of a CUDA graph of the step
                              #  (CUDA, world_size 1 only)
router_scale = [0.02, 0.5]    # std of the random router weights (default 0.02, > 0):
                              #  larger = sharper routing (router_entropy column)

[[zip]]                       # lists of one equal length that vary together; the zipped
hidden = [64, 128]            #  group is crossed with the grid. A key may be in [grid]
ffn = [128, 256]              #  or in one [[zip]], not both (so no hidden/ffn above)

[options]                     # implementation-specific knobs, scalar or list (lists are
cache_experts = [2, 4]        #  swept like grid keys); each case gets, as sorted
                              #  (name, value) pairs, only the options its impl declares
                              #  (ImplInfo.options); one that no impl of the suite
                              #  declares is an error

[[exclude]]                   # drop the cases that match every key of one table
impl = "dense"                #  (a list value matches any of its items); keys: the grid
routing = ["zipf:1.2"]        #  keys, "tokens" (batch x seq_len) and option names

[[include]]                   # if any [[include]] is present, keep only the cases that
num_experts = 8               #  match at least one of them (same keys as [[exclude]])

[cuda.grid]                   # per-device sections, used when the resolved device is
preset = ["mixtral-8x7b", "qwen3-30b-a3b"]   # "cuda"/"cuda:N" ([cuda.*]) or "cpu"
batch = [1, 64, 4096]         #  ([cpu.*]): [X.grid], [X.options] and [X.suite]
                              #  (measurement keys only) are merged key by key over the
                              #  top-level tables; [[X.zip]], [[X.exclude]] and
                              #  [[X.include]] are added to the top-level lists
```

The sections of both devices are checked whatever the device, so a typo in `[cuda.grid]`
shows on a CPU machine too. Note that merging is key by key: a `hidden` in the top-level
`[grid]` also overrides the preset of a `[cuda.grid]`; keep shapes in the device sections
when the devices use different shapes.

Checked before anything runs: table and key names (with the closest allowed name
suggested), value types (bool is not an int; an int is a float), the known impls, presets,
dtypes and modes, each case's LayerShape/Workload problems, its routing spec for its
num_experts, whether its impl supports its dtype, device and mode (ImplInfo), bfloat16 on
the CUDA device, that a CUDA device is visible, equal [[zip]] lengths, a key in both
[grid] and a [[zip]], options no impl declares, and a suite that filters to nothing.

Order: the grid keys as written (the device section's new keys after them), then the
[[zip]] groups, then the options; the last varies fastest. Filters are applied before the
per-case checks, so an [[exclude]] can remove a combination that would be invalid (say
top_k > num_experts). Cases with the same `case_id` are kept once, first one wins.

    >>> suite = parse_suite('''
    ... [suite]
    ... device = "cpu"
    ... [grid]
    ... impl = ["reference", "grouped"]
    ... hidden = 64
    ... ffn = 128
    ... num_experts = [4, 8]
    ... top_k = 2
    ... batch = 1
    ... seq_len = 16
    ... ''')
    >>> len(suite.cases), suite.cases[-1].label()
    (4, 'grouped D64F128 E8k2 T16 forward float32 uniform')
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moebench.case import Case
from moebench.suite_cases import CaseExpander, _matches, runnable_problems
from moebench.suite_schema import (
    DEVICE_SECTIONS,
    FILTER_EXTRA_KEYS,
    GRID_KEYS,
    MAX_EXPANDED_CASES,
    SUITE_KEYS,
    SchemaChecker,
    SuiteError,
    default_suite_name,
    resolve_device,
)

__all__ = [
    "DEVICE_SECTIONS",
    "FILTER_EXTRA_KEYS",
    "GRID_KEYS",
    "SUITE_KEYS",
    "Suite",
    "SuiteError",
    "load_suite",
    "parse_suite",
    "resolve_device",
    "with_impls",
]


@dataclass(frozen=True)
class Suite:
    """A validated suite: its cases in run order and how to measure each one."""

    name: str
    path: str
    description: str
    device: str
    cases: tuple[Case, ...]
    timeout_s: float = 300.0
    budget_ms: float = 2000.0
    warmup: int = 3
    warmup_ms: float = 500.0
    min_repeats: int = 5
    max_repeats: int = 200

    @property
    def impls(self) -> tuple[str, ...]:
        """Implementation names used by the cases, in first-use order."""
        return tuple(dict.fromkeys(case.impl for case in self.cases))


def load_suite(path: str | Path, device: str | None = None) -> Suite:
    """Read and validate the suite file at `path`.

    device: overrides the suite's [suite] device ("cpu", "cuda", "cuda:N" or "auto").
    `path` may also name a built-in suite ("smoke": moebench.catalog).
    Raises SuiteError (naming the file) if the file is missing or the suite is invalid.
    """
    from moebench.catalog import resolve_suite, suite_hint

    path = resolve_suite(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SuiteError(
            f"{path}: cannot read suite file: {exc.strerror or exc}; {suite_hint()}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise SuiteError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); a suite is a TOML file"
        ) from exc
    return parse_suite(text, str(path), device)


def with_impls(suite: Suite, impls: Sequence[str]) -> tuple[Suite, list[str]]:
    """The suite's cases run by `impls` instead of its own implementations (`run
    --impls`): each case once per implementation, in the suite's order, with the
    implementation's default options; a case an implementation cannot run on the
    suite's device (a mode, dtype or device it did not register; several ranks for a
    layer that is not expert-parallel) is left out. Returns
    the suite and one line per reason cases were left out. Raises SuiteError for a name
    that is not an implementation, or when no case is left."""
    from moebench import registry

    for name in impls:
        try:
            registry.get(name)
        except registry.RegistryError as exc:
            raise SuiteError(f"--impls: {exc} (--plugin FILE.py imports one of your own)") from exc
    cases: dict[str, Case] = {}
    seen: set[str] = set()
    left_out: dict[str, int] = {}
    for case in suite.cases:
        for impl in impls:
            swapped = replace(case, impl=impl, options=())
            if swapped.case_id in seen:
                continue
            seen.add(swapped.case_id)
            problems = runnable_problems(swapped, suite.device)
            if problems:
                left_out[problems[0]] = left_out.get(problems[0], 0) + 1
            else:
                cases[swapped.case_id] = swapped
    notes = [f"--impls: {count} case(s) left out: {why}" for why, count in left_out.items()]
    if not cases:
        raise SuiteError(
            f"--impls {','.join(impls)}: no case of {suite.path} left ({'; '.join(notes)})"
        )
    return replace(suite, cases=tuple(cases.values())), notes


def count_cases(path: str | Path, device: str) -> tuple[int, str]:
    """(cases, description) of the suite at `path` on `device` ("cpu" or "cuda"), without
    probing the machine: for listing suites on a machine without that device. The suite
    is validated as `load_suite` does, except the checks that need the device itself."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read suite file: {exc}") from exc
    parser = _DeviceFreeParser(data, str(path), device)
    suite = parser.parse()
    return len(suite.cases), suite.description


def parse_suite(text: str, path: str = "<string>", device: str | None = None) -> Suite:
    """Validate the suite in TOML `text`; `path` is only used to name it in messages and
    as the default suite name. device: as for `load_suite`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: TOML syntax error: {exc}") from exc
    return _SuiteParser(data, path, device).parse()


class _SuiteParser(SchemaChecker):
    """Checks structure and types, expands the product, filters, then checks each case."""

    def check_cases(self, expander: CaseExpander, cases: list[Case], device: str) -> None:
        """The checks of each case against the device (dtype support, ranks, ...)."""
        expander.check_cases(cases, device)

    def parse(self) -> Suite:
        tables = self.top_level_tables()
        suite_table = self.suite_table(tables.get("suite", {}), "suite")
        sections: dict[str, dict[str, Any]] = {}
        for section in DEVICE_SECTIONS:
            raw = tables.get(section, {})
            sections[section] = self.section_tables(raw, section) if raw else {}
        self.raise_if_problems()

        device = self.device(suite_table)
        # Both devices' merged configurations are checked, so that a typo in [cuda.*]
        # shows on a CPU machine too; only the active one is expanded.
        plans = {
            section: self.plan(tables, suite_table, sections[section], section)
            for section in DEVICE_SECTIONS
        }
        self.raise_if_problems()
        plan = plans["cuda" if device.startswith("cuda") else "cpu"]

        combinations = math.prod(len(axis.values) for axis in plan.axes)
        if combinations > MAX_EXPANDED_CASES:
            sizes = " x ".join(f"{len(a.values)} {'/'.join(a.keys)}" for a in plan.axes)
            self.problem(
                f"the grid gives {combinations:,} combinations ({sizes}); allowed: at most "
                f"{MAX_EXPANDED_CASES:,} (split the suite, or sweep fewer values)"
            )
            self.raise_if_problems()
        expander = CaseExpander(self.problem)
        cases = expander.expand(plan.axes, device)
        self.raise_if_problems()
        kept = [
            case
            for case in cases
            if not any(_matches(case, t) for t in plan.excludes)
            and (not plan.includes or any(_matches(case, t) for t in plan.includes))
        ]
        if not kept:
            self.problem(
                f"no cases left: the grid gives {len(cases)} case(s) and the "
                "[[exclude]]/[[include]] tables remove all of them; allowed: filters "
                "that keep at least one case"
            )
        self.check_cases(expander, kept, device)
        self.raise_if_problems()
        settings = plan.settings
        return Suite(
            name=suite_table.get("name") or default_suite_name(self.path),
            path=self.path,
            description=suite_table.get("description", ""),
            device=device,
            cases=tuple(expander.unique(kept)),
            timeout_s=float(settings["timeout_s"]),
            budget_ms=float(settings["budget_ms"]),
            warmup=int(settings["warmup"]),
            warmup_ms=float(settings["warmup_ms"]),
            min_repeats=int(settings["min_repeats"]),
            max_repeats=int(settings["max_repeats"]),
        )


class _DeviceFreeParser(_SuiteParser):
    """Takes the device as given and does not probe it (no torch.cuda call): a case's
    checks are those that hold for any machine, so a case that no such device could
    run (an implementation that runs only on CUDA, in a count for the CPU) is refused
    as `load_suite` refuses it."""

    def device(self, suite_table: dict[str, Any]) -> str:
        return self.device_override or "cpu"

    def check_cases(self, expander: CaseExpander, cases: list[Case], device: str) -> None:
        expander.check_cases(cases, device, probe_device=False)
