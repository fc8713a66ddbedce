"""learnreg: learning and optimizing spatial transformations between images, in physical space.

``learnreg.register(fixed, moving)`` registers two images and returns a
:class:`~learnreg.api.Registration`; ``learnreg.load_result(folder)`` reads a saved one and
``learnreg.apply(result, image)`` warps with it. They load on first use, so ``import learnreg``
(and the command line's start) stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("learnreg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "Registration", "register", "load_result", "apply"]


def __getattr__(name: str):
    if name in ("Registration", "register", "load_result", "apply"):
        from learnreg import api

        return getattr(api, name)
    raise AttributeError(f"module 'learnreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
