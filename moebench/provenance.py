"""Where a run's code came from: moebench, the user's repository, every plugin.

Stored in run.json and the parquet metadata under `environment.provenance`:

    {"moebench": {"version": "0.1.0", "commit": "6466b0a...", "dirty": false,
                  "source": "checkout"},  # or "wheel", or "git" (with the "url" pip used)
     "repository": {"root": "/home/me/kernels", "commit": "91c2...", "dirty": true},
     "plugins": [{"entry_point": "my-moe", "target": "my_pkg.moe",
                  "distribution": "my-pkg", "version": "0.3.1"}]}

moebench's commit is that of the checkout its code lies in (an editable install), or the
commit pip recorded when it installed from git (PEP 610 `direct_url.json`); a wheel built
elsewhere has none. The repository is the git work tree of the working directory, the
user's code, whatever moebench's own origin: its HEAD and whether tracked files differ
from it. `differences` says what changed between two runs, for `moebench compare`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 5.0


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of `git ARGS` in `cwd`, or None (no git, not a work tree, timeout)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(path: Path) -> dict[str, Any] | None:
    """{"root", "commit", "dirty"} of the git work tree holding `path`, or None."""
    root = _git(["rev-parse", "--show-toplevel"], path)
    if not root:
        return None
    commit = _git(["rev-parse", "HEAD"], path)  # None in a repository without commits
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return {"root": root, "commit": commit, "dirty": bool(status) if status is not None else None}


def moebench_source() -> dict[str, Any]:
    """moebench's version, and its commit where it can be known (module docstring)."""
    from moebench import __version__

    package_dir = Path(__file__).resolve().parent
    found: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    checkout = git_state(package_dir)
    # Only moebench's own checkout counts: a venv inside the user's repository puts an
    # installed moebench in their work tree, whose commit is not moebench's.
    if checkout and Path(checkout["root"]).resolve() == package_dir.parent:
        found.update(commit=checkout["commit"], dirty=checkout["dirty"], source="checkout")
        return found
    found["source"] = "wheel"
    try:
        direct_url = metadata.distribution("moebench").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return found
    if direct_url:
        origin = json.loads(direct_url)
        found["url"] = origin.get("url")
        if origin.get("vcs_info"):
            found.update(source="git", commit=origin["vcs_info"].get("commit_id"))
    return found


def version_line() -> str:
    """moebench's version and where it came from, in one line (`moebench --version`):
    its checkout's commit (and whether tracked files changed), the commit pip installed
    from git, or a wheel's version alone."""
    source = moebench_source()
    return f"moebench {source['version']} ({source_phrase(source)})"


def source_phrase(source: Mapping[str, Any]) -> str:
    """Where moebench came from, from `moebench_source()`'s dict: "checkout <commit>[,
    dirty]", "git <commit> from <url>" or "wheel"."""
    commit = str(source.get("commit") or "")[:10]
    if source.get("source") == "checkout":
        return f"checkout {commit or 'without commits'}" + (", dirty" if source["dirty"] else "")
    if source.get("source") == "git":
        return f"git {commit} from {source.get('url')}"
    return "wheel"


def plugin_sources(specs: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every entry-point plugin, and every `--plugin` spec, with the distribution that
    provides it and its version (None for a file or a module of no distribution; a file's
    sha256 instead)."""
    from moebench.registry import ENTRY_POINT_GROUP

    found = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        found.append(
            {
                "entry_point": ep.name,
                "target": ep.value,
                "distribution": dist.name if dist else None,
                "version": dist.version if dist else None,
            }
        )
    owners = metadata.packages_distributions()
    for spec in specs:
        entry: dict[str, Any] = {"plugin": spec, "distribution": None, "version": None}
        if spec.endswith(".py") and Path(spec).is_file():  # no version: its content's hash
            entry["sha256"] = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        elif not spec.endswith(".py"):
            names = owners.get(spec.split(".")[0]) or []
            if names:
                entry.update(distribution=names[0], version=metadata.version(names[0]))
        found.append(entry)
    return found


def collect_provenance(plugins: Iterable[str] = ()) -> dict[str, Any]:
    """moebench's source, the working directory's repository and the plugins."""
    return {
        "moebench": moebench_source(),
        "repository": git_state(Path.cwd()),
        "plugins": plugin_sources(plugins),
    }


def _plugin_versions(meta: Mapping[str, Any]) -> dict[str, str]:
    found = {}
    for plugin in _provenance(meta).get("plugins") or []:
        name = plugin.get("distribution") or plugin.get("plugin") or plugin.get("entry_point")
        found[str(name)] = f"{plugin.get('distribution') or '-'} {plugin.get('version') or '-'}"
    return found


def _provenance(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    return (meta.get("environment") or {}).get("provenance") or {}


def _describe(state: Mapping[str, Any] | None, version: str | None = None) -> str:
    if not state:
        return "unknown"
    commit = str(state.get("commit") or "no commit")[:10]
    dirty = " (dirty)" if state.get("dirty") else ""
    return f"{version} {commit}{dirty}" if version else f"{commit}{dirty}"


def differences(baseline: Mapping[str, Any], candidate: Mapping[str, Any]) -> list[str]:
    """Sentences naming what differs in the code of two runs (their run.json facts):
    moebench's version or commit, the repository's commit or dirty flag, torch, and each
    plugin's distribution version. Runs without provenance (older files) give none."""
    base, cand = _provenance(baseline), _provenance(candidate)
    if not base or not cand:
        return []
    notes = []
    pairs = {
        "moebench": (
            _describe(base.get("moebench"), (base.get("moebench") or {}).get("version")),
            _describe(cand.get("moebench"), (cand.get("moebench") or {}).get("version")),
        ),
        "repository": (_describe(base.get("repository")), _describe(cand.get("repository"))),
        "torch": (
            str((baseline.get("environment") or {}).get("torch")),
            str((candidate.get("environment") or {}).get("torch")),
        ),
    }
    for what, (was, now) in pairs.items():
        if was != now:
            notes.append(f"{what} differs: baseline {was}, candidate {now}")
    base_plugins, cand_plugins = _plugin_versions(baseline), _plugin_versions(candidate)
    for name in sorted(base_plugins.keys() | cand_plugins.keys()):
        was, now = base_plugins.get(name, "absent"), cand_plugins.get(name, "absent")
        if was != now:
            notes.append(f"plugin {name} differs: baseline {was}, candidate {now}")
    return notes
