"""Import extra implementation modules named on the command line (`--plugin`), by module
name or by .py file path, so a user can try an implementation without packaging it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


class PluginError(ValueError):
    """A --plugin that cannot be imported."""


def import_plugin(spec: str) -> list[str]:
    """Import `spec` ("pkg.module" or "path/to/file.py"); its @register calls run.
    Returns the names of the implementations its module (or a module under it)
    registered, also when it had been imported before."""
    from moebench import registry

    try:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            if not path.is_file():
                raise PluginError(f"--plugin {spec}: no such file")
            name = f"moebench_plugin_{path.stem}"
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
        else:
            name = importlib.import_module(spec).__name__
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"--plugin {spec}: import failed: {type(exc).__name__}: {exc}") from exc
    return [
        impl
        for impl, info in registry.available().items()
        if info.build.__module__ == name or info.build.__module__.startswith(f"{name}.")
    ]
