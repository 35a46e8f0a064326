"""Where the ideas plug in. Each idea's package is named in the `frugal.ideas` entry-point group
(pyproject.toml); importing it registers its models and bench methods. The registries call
`load_ideas()` before they answer, so the spine never imports an idea by name."""

from __future__ import annotations

from importlib.metadata import entry_points

_loaded = False


def load_ideas() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: an idea's import may itself ask a registry
    for ep in entry_points(group="frugal.ideas"):
        ep.load()
