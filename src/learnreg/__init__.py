"""learnreg: learning and optimizing spatial transformations between images, in physical space."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("learnreg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
