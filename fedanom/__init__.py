"""fedanom: federated anomaly detection for e-commerce behaviour.

The sub-packages live in top-level folders of the repository (common/, common/detector/, client/,
server/, simulations/) and are mapped onto this namespace by pyproject.toml; the command line is in
fedanom/ itself.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedanom")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"
