"""Where glmtune reads shared fixtures and keeps its caches (environment variables, never globals)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of glmtune's caches: $GLMTUNE_CACHE, else $XDG_CACHE_HOME/glmtune, else ~/.cache/glmtune."""
    if os.environ.get("GLMTUNE_CACHE"):
        return Path(os.environ["GLMTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "glmtune"


def shared_dir() -> Path:
    """The team's shared data and fixtures: $GLMTUNE_SHARED, else `shared/` beside the project folder
    (which exists only in a source checkout; callers skip or explain when it is missing)."""
    if os.environ.get("GLMTUNE_SHARED"):
        return Path(os.environ["GLMTUNE_SHARED"]).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared"


def sample_data_dir() -> Path:
    """The sample dataset shipped inside the package (written by tools/make_sample_dataset.py)."""
    return Path(__file__).resolve().parent / "sample_data"
