"""Suite schema and validation: the tables and keys a suite may have, their types and
allowed values, and the per-device merge into one checked `_Plan` (see `moebench.suite`
for the format). Nothing here expands the product of cases (`moebench.suite_cases`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from moebench import registry
from moebench.case import ALL_FIELDS, DTYPES, MODES, Case, LayerShape, Workload
from moebench.names import name_problem, sanitize_name
from moebench.presets import PRESETS

GRID_KEYS: tuple[str, ...] = tuple(k for k in ALL_FIELDS if k not in ("device", "options"))
"""Keys of [grid] and [[zip]]: every Case field but device and options (preset included)."""
FILTER_EXTRA_KEYS: tuple[str, ...] = ("tokens",)
"""Keys [[exclude]]/[[include]] accept besides the grid keys and the option names."""
MEASUREMENT_DEFAULTS: dict[str, float | int] = {
    "timeout_s": 300.0,
    "budget_ms": 2000.0,
    "warmup": 3,
    "warmup_ms": 500.0,  # CUDA: timed warm-up, so samples run at the clock the card keeps
    "min_repeats": 5,
    "max_repeats": 200,
}
SUITE_KEYS: tuple[str, ...] = (
    "name",
    "description",
    "device",
    "requires",
    *MEASUREMENT_DEFAULTS,
)
DEVICE_SECTIONS: tuple[str, ...] = ("cpu", "cuda")
DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N', 'auto'"
_DICT_TABLES = ("suite", "grid", "options")
_LIST_TABLES = ("zip", "exclude", "include")
TOP_LEVEL_TABLES: tuple[str, ...] = (*_DICT_TABLES, *_LIST_TABLES, *DEVICE_SECTIONS)
SECTION_TABLES: tuple[str, ...] = (*_DICT_TABLES, *_LIST_TABLES)
MAX_EXPANDED_CASES = 5_000_000  # a bigger product is refused before it is built
MAX_REPORTED = 25  # problems listed in one SuiteError; the rest are counted


class SuiteError(ValueError):
    """A suite that cannot be run. The message has one line per problem, each naming the
    file, the table and key, and what is allowed; `problems` holds those lines."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


def default_suite_name(path: str) -> str:
    """The name of a suite without [suite] name: its file's stem, made safe for a path."""
    return sanitize_name(Path(path).stem)


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


# --------------------------------------------------------------------------- checker


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


class SchemaChecker:
    """Checks a suite's structure and types; collects every problem, one line each."""

    def __init__(self, data: dict[str, Any], path: str, device: str | None):
        self.data = data
        self.path = path
        self.device_override = device
        self.problems: list[str] = []
        # [suite] requires: the packages this suite's implementations come from, each with
        # how to install it; unknown impls are explained by a missing one (raise_if_problems).
        self.missing_requires: dict[str, str] = {}
        self.unknown_impl_problems: set[str] = set()

    # ----- reporting

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def raise_if_problems(self) -> None:
        if not self.problems:
            return
        problems = self.problems
        if self.missing_requires and self.unknown_impl_problems:
            # The impls a missing package would register: name the package, not each impl.
            problems = [
                f"[suite] requires {name!r}, which is not installed here: {how}"
                for name, how in self.missing_requires.items()
            ] + [p for p in problems if p not in self.unknown_impl_problems]
        lines = [f"{self.path}: {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            lines.append(f"{self.path}: ... and {len(problems) - MAX_REPORTED} more")
        raise SuiteError("\n".join(lines), lines)

    # ----- structure
    # ----- plans (one per device section)

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
            if key == "requires":
                out[key] = self.requires_table(value, where)
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
        elif "name" in out and (problem := name_problem(out["name"])):
            # The name starts the run id, which names the run's folder under the root.
            self.problem(f"[{where}] key 'name': {problem}")
        return out

    def requires_table(self, value: Any, where: str) -> dict[str, str]:
        """[suite] requires = { package = "how to install it", ... }: the distributions
        (plugin packages) whose implementations the suite runs. Which are missing is noted
        here; it is reported only if an impl is unknown (a --plugin file may register it)."""
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
        ):
            self.problem(
                f"[{where}] key 'requires': expected a table of package name = how to "
                f'install it (strings), as {{ my-plugin = "pip install ./plugin" }}, '
                f"got {_show(value)}"
            )
            return {}
        for name, how in value.items():
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                self.missing_requires[name] = how
        return dict(value)

    def check_settings(self, settings: dict[str, Any], where: str) -> None:
        for key in ("timeout_s", "budget_ms"):
            if settings[key] <= 0:
                self.problem(f"{where} key {key!r}: must be > 0, got {settings[key]}")
        if settings["warmup"] < 0:
            self.problem(f"{where} key 'warmup': must be >= 0, got {settings['warmup']}")
        if settings["warmup_ms"] < 0:
            self.problem(f"{where} key 'warmup_ms': must be >= 0, got {settings['warmup_ms']}")
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
                    message = (
                        f"{where} key {key!r}: unknown {key} {item!r}"
                        f"{_suggest(item, choices)}; known: {', '.join(map(repr, choices))}"
                        + (registry.broken_note() if key == "impl" else "")
                    )
                    self.problem(message)
                    if key == "impl":
                        self.unknown_impl_problems.add(message)
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


def _pick(table: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {key: table[key] for key in keys if key in table}


def _table_forms(prefix: str) -> list[str]:
    forms = [f"[{prefix}{name}]" for name in _DICT_TABLES]
    forms += [f"[[{prefix}{name}]]" for name in _LIST_TABLES]
    if not prefix:
        forms += [f"[{name}.*]" for name in DEVICE_SECTIONS]
    return forms
