"""Where the ideas plug in. Each idea's package is named in the `frugal.ideas` entry-point group
(pyproject.toml); importing it registers its models and bench methods. The registries call
`load_ideas()` before they answer, so the spine never imports an idea by name. An idea that fails to
import is reported (a warning naming it and the error, and `failed_ideas()`), and the others still
load: one broken plugin does not take the toolkit down."""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

_loaded = False
_failed: dict[str, str] = {}  # idea name -> the error its import raised


def load_ideas() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: an idea's import may itself ask a registry
    for ep in entry_points(group="frugal.ideas"):
        try:
            ep.load()
        except Exception as e:  # any failure inside someone's package: named, not fatal
            _failed[ep.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"frugal idea {ep.name!r} ({ep.value}) failed to import and is left out: "
                          f"{type(e).__name__}: {e}", stacklevel=2)


def failed_ideas() -> dict[str, str]:
    """The ideas that failed to import, with their errors."""
    load_ideas()
    return dict(_failed)
