"""`moebench init [DIR]`: set moebench up in your own repository.

    moebench init                   # into the current directory
    moebench init ../kernels --impl fused-moe

writes (refusing to overwrite a file unless --force):

    bench/moebench.toml             a suite: your implementation beside reference and grouped
    bench/plugin/                   a plugin package (pyproject.toml with the entry point,
                                    PACKAGE/moe.py with a working layer to replace)
    bench/test_moebench.py          the suite as pytest-benchmark tests (moebench_layer)
    bench/pytest.ini                bench/ as rootdir: test ids match `moebench export`
    bench/ci.sh                     the CI steps: check plugins, run, compare
    .github/workflows/moebench.yml  GitHub Actions: pinned torch and moebench, main's
                                    results kept as the baseline artifact, pull requests
                                    compared with it (exit 1 on a regression)

The templates are the files under `moebench/scaffold/templates/` (`github/` there is
written as `.github/`), with __IMPL__,
__PACKAGE__, __DIST__, __CLASS__, __FAMILY__, __SUITE__, __TORCH_VERSION__ and
__MOEBENCH_VERSION__ replaced.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from rich.console import Console
from rich.text import Text

from moebench.console import error, say

COMMAND = "init"
HELP = "scaffold a suite, a plugin package and a CI workflow in your repository"
EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXIT_CODES = """exit codes:
  0    written, with the next steps
  2    an --impl name that cannot name a package or is a built-in's, or a file
       that exists (pass --force): nothing written; a folder it cannot write to"""
IMPL_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def substitutions(impl: str) -> dict[str, str]:
    """Template placeholder -> value for the implementation called `impl`."""
    import torch

    from moebench import __version__

    package = impl.replace("-", "_") + "_moebench"
    return {
        "__IMPL__": impl,
        "__PACKAGE__": package,
        "__DIST__": package.replace("_", "-"),
        "__CLASS__": "".join(part.capitalize() for part in impl.split("-")) + "MoE",
        "__FAMILY__": impl,
        "__SUITE__": impl,
        # The local version label (+cpu, +cu128) names the build, not the release.
        "__TORCH_VERSION__": torch.__version__.split("+")[0],
        "__MOEBENCH_VERSION__": __version__,
    }


def _template_files(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found = []
    for entry in folder.iterdir():
        if entry.name == "__pycache__":
            continue
        relative = f"{prefix}{entry.name}"
        if entry.is_dir():
            found += _template_files(entry, f"{relative}/")
        else:
            found.append((relative, entry))
    return sorted(found)


def render(impl: str) -> dict[str, str]:
    """Relative path -> text of every file `moebench init` writes for `impl`."""
    values = substitutions(impl)
    rendered = {}
    for relative, entry in _template_files(resources.files(__name__) / "templates"):
        text = entry.read_text(encoding="utf-8")
        for placeholder, value in values.items():
            relative = relative.replace(placeholder, value)
            text = text.replace(placeholder, value)
        # Package data leaves out dot-folders: the templates keep .github as github.
        rendered[re.sub(r"^github/", ".github/", relative)] = text
    return rendered


def scaffold(target: Path, impl: str, force: bool = False) -> list[Path]:
    """Write the files of `render(impl)` under `target`; ValueError naming the files that
    exist already (nothing is written then) unless `force`."""
    if not IMPL_NAME.fullmatch(impl):
        raise ValueError(
            f"--impl {impl!r}: lowercase letters, digits and single dashes, starting with a "
            "letter (e.g. fused-moe)"
        )
    from moebench import registry

    if impl in registry.available():
        raise ValueError(f"--impl {impl!r} is taken by a moebench implementation; pick another")
    files = {target / relative: text for relative, text in render(impl).items()}
    existing = [str(path) for path in files if path.exists()]
    if existing and not force:
        raise ValueError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if path.suffix == ".sh":
            path.chmod(0o755)
    return list(files)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moebench init`."""
    parser.add_argument("dir", nargs="?", default=".", help="your repository (default: .)")
    parser.add_argument(
        "--impl", default="my-moe", help="your implementation's name (default: my-moe)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def main(args: argparse.Namespace, console: Console) -> int:
    """Run `moebench init`; returns the exit status."""
    target = Path(args.dir)
    try:
        written = scaffold(target, args.impl, args.force)
    except (ValueError, OSError) as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    for path in written:
        say(console, f"wrote {path}")
    package = substitutions(args.impl)["__PACKAGE__"]
    next_steps = (
        f"\nnext, in {target}:\n"
        "  pip install ./bench/plugin          # your plugin: `moebench list` shows it\n"
        f"  moebench run bench/moebench.toml    # {args.impl} beside reference and grouped\n"
        f"  edit bench/plugin/{package}/moe.py  # your kernel in `routed`\n"
        "  commit .github/workflows/moebench.yml: main's runs become the baseline"
    )
    # as written (a folder's name is no markup), each command whole to copy
    console.print(Text(next_steps), soft_wrap=True, highlight=False)
    return EXIT_OK
