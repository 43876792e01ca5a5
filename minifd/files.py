"""Small file helpers shared by the tables minifd writes (dispatch table, calibration)."""

import os
from pathlib import Path


def cache_root():
    """Where minifd keeps what it prepares and measures: $MINIFD_CACHE, else $XDG_CACHE_HOME/minifd,
    else ~/.cache/minifd."""
    explicit = os.environ.get("MINIFD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "minifd"


def write_text_atomically(path, text):
    """Replace `path` with `text` so that readers see the old file or the new one, never half of
    either: write a temporary file beside it, flush it to disk, then rename it over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
