"""Fold the fused layer's tuned choices into the ones moebench ships, so that a first run
on that card takes them instead of tuning (moebench/impls/triton/tuning.py).

    python scripts/ship_tuning.py CACHE.json [CACHE.json ...] [--replace]
    python scripts/ship_tuning.py tune-log.jsonl --device NVIDIA_H200.json

A SOURCE is a tuning cache (`<device name>.json`, as `$MOEBENCH_TRITON_CACHE` holds it and
`scripts/gpu_session.sh` brings it back in $OUT/tune-cache/), whose file name names the
device (one that ships choices already: a new device takes `--device`, so that a renamed
cache does not become a file no card looks up), or a tuning log (`*.jsonl`,
`$MOEBENCH_TRITON_TUNE_LOG`), whose device `--device` names. Each choice replaces the
shipped ones of the same key made for other code, as the tuner's own cache does;
`--replace` starts from no shipped choice for that device (after a run that tuned every
key on the current code). Prints one line per device file written. Exit status: 0
written, 2 a source that is missing, not a cache or log, or a cache naming no device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moebench.impls.triton.tuning import device_file_name, merge_choice, read_log, shipped_dir


class SourceError(ValueError):
    """A source that is not a tuning cache or log."""


def read_choices(source: Path) -> list[tuple[str, dict]]:
    """(full key, choice) pairs of a cache file or a tuning log, in file order (a log's
    tunings that chose nothing left out)."""
    try:
        text = source.read_text()
    except OSError as error:
        raise SourceError(f"{source}: cannot read it ({error.strerror})") from None
    if source.suffix == ".jsonl":
        try:
            tunings = [tuning for _, tuning in read_log(text)]
        except ValueError as error:
            raise SourceError(f"{source}: {error}") from None
        return [
            (_checked_key(tuning["key"], source), _checked_choice(tuning["chosen"], source))
            for tuning in tunings
            if tuning["chosen"] is not None  # every candidate failed: nothing to ship
        ]
    table = _json_object(source, text, "a tuning cache")
    return [(_checked_key(k, source), _checked_choice(v, source)) for k, v in table.items()]


def _json_object(path: Path, text: str, what: str) -> dict:
    """`text` (of `path`) as the one JSON object a cache or shipped file is."""
    try:
        table = json.loads(text)
    except ValueError:
        table = None
    if not isinstance(table, dict):
        raise SourceError(f"{path}: not {what} (one JSON object of choices)")
    return table


def _checked_key(full_key: object, source: Path) -> str:
    if not isinstance(full_key, str) or " " not in full_key:
        raise SourceError(f"{source}: {full_key!r} is not a key and its fingerprint")
    return full_key


def _checked_choice(choice: object, source: Path) -> dict:
    if not isinstance(choice, dict) or not choice:
        raise SourceError(f"{source}: {choice!r} is not a choice (a JSON object of settings)")
    return choice


def ship(sources: list[Path], device: str | None, into: Path, replace: bool) -> list[str]:
    """Write each device's shipped file in `into` with the choices of `sources` folded in
    (module docstring); the lines that say what was written."""
    by_device: dict[str, list[tuple[str, dict]]] = {}
    for source in sources:
        if source.suffix == ".jsonl" and device is None:
            raise SourceError(f"{source}: a tuning log does not name its device; pass --device")
        pairs = read_choices(source)
        name = device_file_name(device or source.name)
        if device is None and not (into / name).exists():
            # a renamed cache would otherwise become a new device's file, never looked up
            raise SourceError(
                f"{source}: no device ships {name} yet; a cache is named for its device as "
                "the tuner writes it (NVIDIA_H200.json): pass --device for a new device"
            )
        by_device.setdefault(name, []).extend(pairs)
    lines = []
    for name, pairs in by_device.items():
        path = into / name
        # a shipped file that does not read is an error, not a loss: mend it or --replace
        before = {}
        if not replace and path.exists():
            before = _json_object(path, path.read_text(), "a shipped file")
        table = dict(before)
        for full_key, choice in pairs:
            table = merge_choice(table, full_key, choice)
        into.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        added = len(set(table) - set(before))
        dropped = len(set(before) - set(table))
        lines.append(
            f"{path}: {len(table)} choices ({added} new, {dropped} dropped"
            f"{', the old ones not read' if replace else ''})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="tuning caches or logs")
    parser.add_argument("--device", help='the device: "NVIDIA H200" or NVIDIA_H200.json')
    parser.add_argument("--replace", action="store_true", help="drop the shipped choices")
    parser.add_argument("--into", type=Path, default=shipped_dir(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        lines = ship(args.sources, args.device, args.into, args.replace)
    except SourceError as error:
        print(f"ship_tuning: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
