"""The Python API, also exported at the top level: ``learnreg.register(fixed, moving)``."""

from learnreg.api.registration import Registration, apply, load_result, register

__all__ = ["Registration", "register", "load_result", "apply"]
