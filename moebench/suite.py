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
device = "cpu"                # "cpu" | "cuda" | "cuda:N" | "auto" (default "auto":
                              #  "cuda" if torch.cuda.is_available() else "cpu");
                              #  load_suite(device=...) / --device overrides it
timeout_s = 60                # per-case timeout (default 300)
budget_ms = 200               # per-case timing budget (default 2000)
warmup = 2                    # warm-up calls (default 3)
min_repeats = 3               # default 5
max_repeats = 50              # default 200; must be >= min_repeats

[grid]                        # cartesian product; each value a scalar or a non-empty list
impl = ["reference", "grouped", "capacity", "dense"]    # required (here or in a [[zip]])
preset = "mixtral-8x7b"       # a moebench.presets.PRESETS name ("" = none): fills the
                              #  shape; explicit shape keys below override the preset's
num_experts = [4, 8]          # hidden, ffn, num_experts, top_k: required without a preset
top_k = [1, 2]
shared_experts = 0            # default 0
capacity_factor = 1.25        # default 1.25 (int or float)
activation = "swiglu"         # default "swiglu" (the only one)
batch = [1, 4]                # required
seq_len = 16                  # required
mode = ["forward", "train"]   # default "forward"
dtype = ["float32", "bfloat16"]                  # default "float32"
routing = ["uniform", "zipf:1.2", "hot:2:0.5"]   # default "uniform"
seed = 0                      # default 0
world_size = 1                # default 1
cuda_graph = false            # default false: time replays of a CUDA graph of the step
                              #  (CUDA, world_size 1 only)

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

import difflib
import itertools
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from moebench import registry
from moebench.case import (
    ALL_FIELDS,
    DTYPES,
    MODES,
    SHAPE_FIELDS,
    WORKLOAD_FIELDS,
    Case,
    LayerShape,
    Workload,
)
from moebench.presets import PRESETS
from moebench.routing import RoutingSpecError, routing_prior

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
]

GRID_KEYS: tuple[str, ...] = tuple(k for k in ALL_FIELDS if k not in ("device", "options"))
"""Keys of [grid] and [[zip]]: every Case field but device and options (preset included)."""
FILTER_EXTRA_KEYS: tuple[str, ...] = ("tokens",)
"""Keys [[exclude]]/[[include]] accept besides the grid keys and the option names."""
MEASUREMENT_DEFAULTS: dict[str, float | int] = {
    "timeout_s": 300.0,
    "budget_ms": 2000.0,
    "warmup": 3,
    "min_repeats": 5,
    "max_repeats": 200,
}
SUITE_KEYS: tuple[str, ...] = ("name", "description", "device", *MEASUREMENT_DEFAULTS)
DEVICE_SECTIONS: tuple[str, ...] = ("cpu", "cuda")
DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N', 'auto'"
_DICT_TABLES = ("suite", "grid", "options")
_LIST_TABLES = ("zip", "exclude", "include")
TOP_LEVEL_TABLES: tuple[str, ...] = (*_DICT_TABLES, *_LIST_TABLES, *DEVICE_SECTIONS)
SECTION_TABLES: tuple[str, ...] = (*_DICT_TABLES, *_LIST_TABLES)
MAX_REPORTED = 25  # problems listed in one SuiteError; the rest are counted


class SuiteError(ValueError):
    """A suite that cannot be run. The message has one line per problem, each naming the
    file, the table and key, and what is allowed; `problems` holds those lines."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


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
    min_repeats: int = 5
    max_repeats: int = 200

    @property
    def impls(self) -> tuple[str, ...]:
        """Implementation names used by the cases, in first-use order."""
        return tuple(dict.fromkeys(case.impl for case in self.cases))


def resolve_device(name: str) -> str:
    """The concrete device for `name`: "auto" -> "cuda" if torch sees a GPU else "cpu".

    "cpu" is returned as is (torch.cuda is not probed); "cuda" and "cuda:N" are checked
    against the visible devices. Raises ValueError with what is allowed.
    """
    if name == "cpu":
        return "cpu"
    if name not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"unknown device {name!r}; allowed: {DEVICE_FORMS}")
    import torch

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ValueError(
            f"device {name!r} requested but no CUDA device is visible "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    if ":" in name:
        index, count = int(name.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device {name!r}: only {count} CUDA device(s) visible; "
                f"allowed: cuda:0 .. cuda:{count - 1}"
            )
    return name


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
    return parse_suite(text, str(path), device)


def count_cases(path: str | Path, device: str) -> tuple[int, str]:
    """(cases, description) of the suite at `path` on `device` ("cpu" or "cuda"), without
    probing the machine: for listing suites on a machine without that device. The suite
    is validated as `load_suite` does, except the checks that need the device itself."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
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


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class _Kind:
    """The type a key's values must have, and the values it allows (if a fixed set)."""

    name: str
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value
    choices: Callable[[], Iterable[str]] | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


_INT = _Kind("int", _is_int)
_FLOAT = _Kind("number (int or float)", lambda v: _is_int(v) or isinstance(v, float), float)
_STR = _Kind("string", lambda v: isinstance(v, str))
_SCALAR = _Kind("scalar (string, int, float or bool)", _is_scalar)


def _kind_of(hint: Any) -> _Kind:
    if hint is bool:
        return _Kind("bool", lambda v: isinstance(v, bool))
    if hint is int:
        return _INT
    if hint is float:
        return _FLOAT
    if hint is str:
        return _STR
    if get_origin(hint) is Literal:
        allowed = tuple(get_args(hint))
        return _Kind("string", lambda v: isinstance(v, str), choices=lambda: allowed)
    return _SCALAR


def _field_kinds() -> dict[str, _Kind]:
    hints: dict[str, Any] = {}
    for cls in (LayerShape, Workload, Case):
        hints.update(get_type_hints(cls))
    kinds = {key: _kind_of(hints.get(key)) for key in GRID_KEYS}
    # Value sets known without looking at a case; the rest are checked per case.
    kinds["impl"] = _Kind("string", _STR.check, choices=lambda: registry.available())
    kinds["preset"] = _Kind("string", _STR.check, choices=lambda: ("", *PRESETS))
    kinds["dtype"] = _Kind("string", _STR.check, choices=lambda: DTYPES)
    kinds["mode"] = _Kind("string", _STR.check, choices=lambda: MODES)
    kinds["tokens"] = _INT
    return kinds


_KINDS = _field_kinds()


def _required(cls: type) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in fields(cls)
        if f.default is MISSING
        and f.default_factory is MISSING
        and f.name not in ("shape", "workload")
    )


_REQUIRED_SHAPE = _required(LayerShape)
_REQUIRED_OTHER = _required(Workload) + _required(Case)


def _suggest(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------- parser


@dataclass
class _Plan:
    """One device's merged configuration: what to expand and how to filter it."""

    settings: dict[str, Any]
    axes: list[_Axis]
    excludes: list[dict[str, list[Any]]]
    includes: list[dict[str, list[Any]]]


@dataclass
class _Axis:
    """One dimension of the product: a grid key, a zip group or an option."""

    keys: tuple[str, ...]
    values: list[tuple[Any, ...]]
    is_option: bool = False


class _SuiteParser:
    """Checks structure and types, expands the product, filters, then checks each case."""

    def __init__(self, data: dict[str, Any], path: str, device: str | None):
        self.data = data
        self.path = path
        self.device_override = device
        self.problems: list[str] = []

    # ----- reporting

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def raise_if_problems(self) -> None:
        if not self.problems:
            return
        lines = [f"{self.path}: {p}" for p in self.problems[:MAX_REPORTED]]
        if len(self.problems) > MAX_REPORTED:
            lines.append(f"{self.path}: ... and {len(self.problems) - MAX_REPORTED} more")
        raise SuiteError("\n".join(lines), lines)

    # ----- structure

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

        cases = self.expand(plan.axes, device)
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
        self.check_cases(kept, device)
        self.raise_if_problems()
        unique: dict[str, Case] = {}
        for case in kept:
            unique.setdefault(case.case_id, case)
        settings = plan.settings
        return Suite(
            name=suite_table.get("name", Path(self.path).stem),
            path=self.path,
            description=suite_table.get("description", ""),
            device=device,
            cases=tuple(unique.values()),
            timeout_s=float(settings["timeout_s"]),
            budget_ms=float(settings["budget_ms"]),
            warmup=int(settings["warmup"]),
            min_repeats=int(settings["min_repeats"]),
            max_repeats=int(settings["max_repeats"]),
        )

    def plan(
        self,
        tables: dict[str, Any],
        suite_table: dict[str, Any],
        section_tables: dict[str, Any],
        section: str,
    ) -> _Plan:
        """The top-level tables with one device section merged over them, checked."""
        settings = {**MEASUREMENT_DEFAULTS, **_pick(suite_table, MEASUREMENT_DEFAULTS)}
        settings.update(section_tables.get("suite", {}))
        with_section = f" (with [{section}.suite])" if "suite" in section_tables else ""
        self.check_settings(settings, f"[suite]{with_section}")

        grid = self.grid_table(tables.get("grid", {}), "grid")
        section_grid = section_tables.get("grid", {})
        owner = {key: f"[{section}.grid]" if key in section_grid else "[grid]" for key in grid}
        owner.update({key: f"[{section}.grid]" for key in section_grid})
        grid.update(section_grid)

        options = self.options_table(tables.get("options", {}), "options")
        section_options = section_tables.get("options", {})
        options_owner = {key: f"[{section}.options]" for key in section_options}
        options.update(section_options)

        lists: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for name in _LIST_TABLES:
            top = tables.get(name, [])
            lists[name] = [(f"[[{name}]] #{i + 1}", t) for i, t in enumerate(top)]
            lists[name] += [
                (f"[[{section}.{name}]] #{i + 1}", t)
                for i, t in enumerate(section_tables.get(name, []))
            ]
        zips = self.zip_tables(lists["zip"], owner)
        filter_keys = (*GRID_KEYS, *FILTER_EXTRA_KEYS, *options)
        excludes = [self.filter_table(t, where, filter_keys) for where, t in lists["exclude"]]
        includes = [self.filter_table(t, where, filter_keys) for where, t in lists["include"]]
        self.check_options(grid, zips, options, options_owner)

        axes = [_Axis((key,), [(v,) for v in values]) for key, values in grid.items()]
        axes += zips
        axes += [_Axis((k,), [(v,) for v in vs], is_option=True) for k, vs in options.items()]
        return _Plan(settings, axes, excludes, includes)

    def top_level_tables(self) -> dict[str, Any]:
        tables: dict[str, Any] = {}
        for key, value in self.data.items():
            if key not in TOP_LEVEL_TABLES:
                self.problem(
                    f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL_TABLES)}; "
                    f"allowed tables: {', '.join(_table_forms(''))}"
                )
            elif self.table_shape_ok(value, key, f"[{key}]"):
                tables[key] = value
        return tables

    def table_shape_ok(self, value: Any, name: str, where: str) -> bool:
        """[x] for suite/grid/options/devices, [[x]] (array of tables) for the lists."""
        if name in _LIST_TABLES:
            if isinstance(value, list) and all(isinstance(t, dict) for t in value):
                return True
            self.problem(
                f"key {name!r}: expected an array of tables, written [[{where[1:-1]}]] "
                f"(one per group/filter), got {_show(value)}"
            )
            return False
        if isinstance(value, dict):
            return True
        self.problem(f"key {name!r}: expected a table, written {where}, got {_show(value)}")
        return False

    def section_tables(self, raw: dict[str, Any], section: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            where = f"[{section}.{key}]"
            if key not in SECTION_TABLES:
                forms = ", ".join(_table_forms(section + "."))
                self.problem(
                    f"[{section}] unknown key {key!r}{_suggest(key, SECTION_TABLES)}; "
                    f"allowed: {forms}"
                )
                continue
            if not self.table_shape_ok(value, key, where):
                continue
            if key == "suite":
                out[key] = self.suite_table(value, f"{section}.suite", measurement_only=True)
            elif key == "grid":
                out[key] = self.grid_table(value, f"{section}.grid")
            elif key == "options":
                out[key] = self.options_table(value, f"{section}.options")
            else:
                out[key] = value
        return out

    # ----- [suite]

    def suite_table(
        self, table: dict[str, Any], where: str, measurement_only: bool = False
    ) -> dict[str, Any]:
        allowed = tuple(MEASUREMENT_DEFAULTS) if measurement_only else SUITE_KEYS
        out: dict[str, Any] = {}
        for key, value in table.items():
            if key not in allowed:
                self.problem(
                    f"[{where}] unknown key {key!r}{_suggest(key, allowed)}; "
                    f"allowed: {', '.join(allowed)}"
                )
                continue
            kind = (
                _STR
                if key in ("name", "description", "device")
                else (_INT if isinstance(MEASUREMENT_DEFAULTS[key], int) else _FLOAT)
            )
            if not kind.check(value):
                self.problem(f"[{where}] key {key!r}: expected {kind.name}, got {_show(value)}")
                continue
            out[key] = kind.convert(value)
        if out.get("name") == "":
            self.problem(f"[{where}] key 'name': must not be empty; allowed: a non-empty name")
        return out

    def check_settings(self, settings: dict[str, Any], where: str) -> None:
        for key in ("timeout_s", "budget_ms"):
            if settings[key] <= 0:
                self.problem(f"{where} key {key!r}: must be > 0, got {settings[key]}")
        if settings["warmup"] < 0:
            self.problem(f"{where} key 'warmup': must be >= 0, got {settings['warmup']}")
        if settings["min_repeats"] < 1:
            self.problem(f"{where} key 'min_repeats': must be >= 1, got {settings['min_repeats']}")
        if settings["max_repeats"] < settings["min_repeats"]:
            self.problem(
                f"{where} key 'max_repeats': must be >= min_repeats "
                f"({settings['min_repeats']}), got {settings['max_repeats']}"
            )

    def device(self, suite_table: dict[str, Any]) -> str:
        if self.device_override is not None:
            name, where = self.device_override, "device (from the --device override)"
        else:
            name, where = suite_table.get("device", "auto"), "[suite] key 'device'"
        try:
            return resolve_device(name)
        except ValueError as exc:
            self.problem(f"{where}: {exc}")
            return "cpu"

    # ----- [grid], [[zip]], [options], filters

    def values_of(
        self, key: str, value: Any, where: str, kind: _Kind, *, allow_scalar: bool = True
    ) -> list[Any] | None:
        """The list of values of `key` (a scalar is a list of one), type-checked."""
        if isinstance(value, list):
            items = value
            if not items:
                self.problem(f"{where} key {key!r}: empty list; allowed: a non-empty list")
                return None
        elif allow_scalar:
            items = [value]
        else:
            self.problem(
                f"{where} key {key!r}: expected a list of {kind.name} values, got {_show(value)}"
            )
            return None
        out = []
        for item in items:
            if not kind.check(item):
                self.problem(
                    f"{where} key {key!r}: expected {kind.name}"
                    f"{' or a list of them' if allow_scalar else ''}, got {_show(item)}"
                )
                return None
            item = kind.convert(item)
            if kind.choices is not None:
                choices = list(kind.choices())
                if item not in choices:
                    self.problem(
                        f"{where} key {key!r}: unknown {key} {item!r}"
                        f"{_suggest(item, choices)}; known: {', '.join(map(repr, choices))}"
                        + (registry.broken_note() if key == "impl" else "")
                    )
                    return None
            out.append(item)
        return out

    def check_keys(self, table: Mapping[str, Any], where: str, allowed: Iterable[str]) -> bool:
        allowed = tuple(allowed)
        ok = True
        for key in table:
            if key not in allowed:
                if key in ("device", "options") and where.endswith("grid]"):
                    hint = (
                        "; the device comes from [suite] device or --device"
                        if key == "device"
                        else "; options go in an [options] table"
                    )
                else:
                    hint = _suggest(key, allowed)
                self.problem(f"{where} unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
                ok = False
        return ok

    def grid_table(self, table: dict[str, Any], name: str) -> dict[str, list[Any]]:
        where = f"[{name}]"
        self.check_keys(table, where, GRID_KEYS)
        out = {}
        for key, value in table.items():
            if key in GRID_KEYS:
                values = self.values_of(key, value, where, _KINDS[key])
                if values is not None:
                    out[key] = values
        return out

    def zip_tables(
        self, tables: list[tuple[str, dict[str, Any]]], grid_owner: dict[str, str]
    ) -> list[_Axis]:
        """One axis per [[zip]] table; `grid_owner` maps each grid key to its table."""
        axes: list[_Axis] = []
        owner = dict(grid_owner)
        for where, table in tables:
            if not table:
                self.problem(f"{where}: empty zip table; allowed keys: {', '.join(GRID_KEYS)}")
                continue
            self.check_keys(table, where, GRID_KEYS)
            columns: dict[str, list[Any]] = {}
            for key, value in table.items():
                if key not in GRID_KEYS:
                    continue
                if key in owner:
                    self.problem(
                        f"{where} key {key!r}: already set in {owner[key]}; "
                        "allowed: each key in [grid] or in one [[zip]], not both"
                    )
                    continue
                owner[key] = where
                values = self.values_of(key, value, where, _KINDS[key], allow_scalar=False)
                if values is not None:
                    columns[key] = values
            lengths = {key: len(values) for key, values in columns.items()}
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{k}={n}" for k, n in lengths.items())
                self.problem(
                    f"{where} key {next(iter(lengths))!r}: lists of unequal length "
                    f"({shown}); allowed: lists of one length, which vary together"
                )
            elif columns:
                axes.append(_Axis(tuple(columns), list(zip(*columns.values()))))
        return axes

    def options_table(self, table: dict[str, Any], name: str) -> dict[str, list[Any]]:
        out = {}
        for key, value in table.items():
            if key in ALL_FIELDS or key == "tokens":
                self.problem(
                    f"[{name}] key {key!r}: is a case field, not an option; "
                    "allowed: put it in [grid]"
                )
                continue
            values = self.values_of(key, value, f"[{name}]", _SCALAR)
            if values is not None:
                out[key] = values
        return out

    def filter_table(
        self, table: dict[str, Any], where: str, allowed: tuple[str, ...]
    ) -> dict[str, list[Any]]:
        """The filter as key -> list of accepted values (a scalar is a list of one)."""
        if not table:
            self.problem(
                f"{where}: empty filter table (it would match every case); "
                f"allowed keys: {', '.join(allowed)}"
            )
        self.check_keys(table, where, allowed)
        out = {}
        for key, value in table.items():
            if key in allowed:
                values = self.values_of(key, value, where, _KINDS.get(key, _SCALAR))
                if values is not None:
                    out[key] = values
        return out

    def check_options(
        self,
        grid: dict[str, list[Any]],
        zips: list[_Axis],
        options: dict[str, list[Any]],
        options_owner: dict[str, str],
    ) -> None:
        """Every option must be declared (ImplInfo.options) by an impl of the suite."""
        impls = list(grid.get("impl", []))
        for axis in zips:
            if "impl" in axis.keys:
                index = axis.keys.index("impl")
                impls += [row[index] for row in axis.values]
        impls = list(dict.fromkeys(impls))
        if not impls:  # a device section without impls is never expanded
            return
        declared = {name for impl in impls for name in registry.get(impl).options}
        for name in options:
            if name not in declared:
                where = options_owner.get(name, "[options]")
                self.problem(
                    f"{where} key {name!r}: not read by any implementation of this suite "
                    f"({', '.join(impls)}); allowed: "
                    f"{', '.join(sorted(declared)) or 'none (they declare no options)'}"
                    f"{_suggest(name, declared)}"
                )

    # ----- expansion and per-case checks

    def expand(self, axes: list[_Axis], device: str) -> list[Case]:
        present = {key for axis in axes if not axis.is_option for key in axis.keys}
        missing = [key for key in _REQUIRED_OTHER if key not in present]
        if "preset" not in present:
            missing += [key for key in _REQUIRED_SHAPE if key not in present]
        for key in missing:
            extra = " (or a preset)" if key in _REQUIRED_SHAPE else ""
            self.problem(
                f"[grid] key {key!r}: required{extra} but not set in [grid] or [[zip]]; "
                f"allowed: {', '.join(GRID_KEYS)}"
            )
        if missing:
            return []
        cases = []
        for combination in itertools.product(*(axis.values for axis in axes)):
            chosen: dict[str, Any] = {}
            options: dict[str, Any] = {}
            for axis, row in zip(axes, combination):
                (options if axis.is_option else chosen).update(zip(axis.keys, row))
            case = self.make_case(chosen, options, device)
            if case is not None:
                cases.append(case)
        return cases

    def make_case(
        self, chosen: dict[str, Any], options: dict[str, Any], device: str
    ) -> Case | None:
        preset = chosen.get("preset", "")
        shape = asdict(PRESETS[preset]) if preset else {}
        shape.update({k: v for k, v in chosen.items() if k in SHAPE_FIELDS})
        missing = [key for key in _REQUIRED_SHAPE if key not in shape]
        if missing:
            self.problem(
                f"[grid] key {missing[0]!r}: required when preset is '' but not set; "
                "allowed: set it in [grid]/[[zip]] or name a preset"
            )
            return None
        declared = registry.get(chosen["impl"]).options
        rest = {k: v for k, v in chosen.items() if k not in SHAPE_FIELDS + WORKLOAD_FIELDS}
        return Case(
            shape=LayerShape(**shape),
            workload=Workload(**{k: v for k, v in chosen.items() if k in WORKLOAD_FIELDS}),
            device=device,
            options=tuple(sorted((k, v) for k, v in options.items() if k in declared)),
            **rest,
        )

    def check_cases(self, cases: list[Case], device: str) -> None:
        # (key, message) -> [count, first case]: one line per distinct problem.
        found: dict[tuple[str, str], list[Any]] = {}
        checked: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        on_cuda = device.startswith("cuda")
        bf16_ok: bool | None = None
        for case in cases:
            memo_key = (
                case.shape,
                case.workload,
                case.impl,
                case.dtype,
                case.routing,
                case.seed,
                case.world_size,
                case.cuda_graph,
            )
            if memo_key not in checked:
                problems = case.shape.problems() + case.workload.problems()
                problems += self.case_problems(case, device)
                if on_cuda and case.dtype == "bfloat16":
                    if bf16_ok is None:
                        import torch

                        bf16_ok = bool(torch.cuda.is_bf16_supported())
                    if not bf16_ok:
                        problems.append(
                            (
                                "dtype",
                                (
                                    f"bfloat16 is not supported by CUDA device {device!r} "
                                    "(torch.cuda.is_bf16_supported() is False); allowed: "
                                    "float32 or float16"
                                ),
                            )
                        )
                checked[memo_key] = problems
            for key, message in checked[memo_key]:
                entry = found.setdefault((key, message), [0, case])
                entry[0] += 1
        for (key, message), (count, case) in found.items():
            more = f", and {count - 1} more case(s)" if count > 1 else ""
            options = f" {dict(case.options)}" if case.options else ""
            self.problem(f"key {key!r}: {message} (in case '{case.label()}{options}'{more})")

    def case_problems(self, case: Case, device: str) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if case.shape.num_experts >= 1:
            try:
                routing_prior(case.routing, case.shape.num_experts)
            except RoutingSpecError as exc:
                problems.append(("routing", str(exc)))
        if case.weights != "random":
            from moebench.weight_sources import validate_weights_spec

            if problem := validate_weights_spec(case.weights):
                problems.append(("weights", problem))
        if case.cuda_graph and not (device.startswith("cuda") and case.world_size == 1):
            problems.append(
                ("cuda_graph", "needs a CUDA device and world_size 1; allowed: false here")
            )
        for key, minimum in (("world_size", 1), ("seed", 0)):
            if getattr(case, key) < minimum:
                problems.append((key, f"must be >= {minimum}, got {getattr(case, key)}"))
        info = registry.get(case.impl)
        if case.dtype not in info.dtypes:
            problems.append(
                (
                    "dtype",
                    (
                        f"impl {case.impl!r} does not support dtype {case.dtype!r}; "
                        f"allowed for it: {', '.join(info.dtypes)}"
                    ),
                )
            )
        device_type = device.split(":")[0]
        if device_type not in info.devices:
            problems.append(
                (
                    "impl",
                    (
                        f"impl {case.impl!r} does not run on device {device!r}; "
                        f"allowed for it: {', '.join(info.devices)}"
                    ),
                )
            )
        if case.workload.mode in MODES and case.workload.mode not in info.modes:
            problems.append(
                (
                    "mode",
                    (
                        f"impl {case.impl!r} does not support mode {case.workload.mode!r}; "
                        f"allowed for it: {', '.join(info.modes)}"
                    ),
                )
            )
        return problems


_MISSING = object()


def _matches(case: Case, table: dict[str, list[Any]]) -> bool:
    """True if every key of the filter table matches (a list matches any of its items)."""
    flat = case.fields()
    for key, allowed in table.items():
        value = flat[key] if key in flat else case.option(key, _MISSING)
        if value is _MISSING or value not in allowed:
            return False
    return True


def _pick(table: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {key: table[key] for key in keys if key in table}


def _table_forms(prefix: str) -> list[str]:
    forms = [f"[{prefix}{name}]" for name in _DICT_TABLES]
    forms += [f"[[{prefix}{name}]]" for name in _LIST_TABLES]
    if not prefix:
        forms += [f"[{name}.*]" for name in DEVICE_SECTIONS]
    return forms


class _DeviceFreeParser(_SuiteParser):
    """Takes the device as given (no torch.cuda probe, no per-case device checks)."""

    def device(self, suite_table: dict[str, Any]) -> str:
        return self.device_override or "cpu"

    def check_cases(self, cases: list[Case], device: str) -> None:
        return None
