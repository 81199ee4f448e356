"""The versions of installed packages, as records and cache keys name them."""

from __future__ import annotations


def installed(names: tuple[str, ...]) -> dict[str, str]:
    """Each of ``names`` that is installed, with its version."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
