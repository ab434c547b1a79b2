"""teisup: a Trio supervision tree that runs many HuggingFace TEI instances.

The layers, one package each (see ARCHITECTURE.md):

* `teisup.supervision`: OTP-style supervisors, restart policy, introspection.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("teisup")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
