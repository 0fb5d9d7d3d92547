"""The registry: duplicates refused, broken plugins listed, nothing else broken."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from moebench import registry
from moebench.cli import main


def test_duplicate_name_is_refused():
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("grouped", family="x", description="x")(lambda w, c: None)


def test_unknown_name_lists_known():
    with pytest.raises(registry.RegistryError, match=r"known: 'capacity', .*'grouped'"):
        registry.get("nope")


def test_broken_entry_point_is_listed_not_fatal(monkeypatch, capsys, tmp_path):
    good = EntryPoint("good", "tests.plugin_good", registry.ENTRY_POINT_GROUP)
    bad = EntryPoint("bad", "no_such_module_xyz", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [bad, good])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_BROKEN", {})
    try:
        registry.load_all()
        assert "bad" in registry.broken()
        assert "No module named 'no_such_module_xyz'" in registry.broken()["bad"].error
        info = registry.get("test-good")
        assert info.source.startswith("plugin good")
        assert main(["list"]) == 1  # a CI step checking its plugins fails
        out = capsys.readouterr().out
        assert "broken" in out and "test-good" in out and "grouped" in out
        assert "1 plugin(s) failed to import" in out
        # An implementation the broken plugin would have registered: the error names it.
        with pytest.raises(registry.RegistryError, match=r"bad \(no_such_module_xyz\)"):
            registry.get("my-moe")
        suite = tmp_path / "s.toml"
        suite.write_text(
            '[suite]\ndevice = "cpu"\n[grid]\nimpl = ["my-moe"]\nhidden = 8\nffn = 8\n'
            "num_experts = 2\ntop_k = 1\nbatch = 1\nseq_len = 2\n"
        )
        assert main(["run", str(suite), "--out", str(tmp_path)]) == 2
        out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        assert "unknown impl 'my-moe'" in out and "No module named 'no_such_module_xyz'" in out
    finally:
        registry.unregister("test-good")
