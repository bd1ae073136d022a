"""retinaops: train, sweep, evaluate, promote and serve the `retinanet` detector on Ray and MLflow.

The `retinaops` command line lives in `retinaops.cli`; the detector itself is the `retinanet` package,
which never imports this one.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retinanet-platform")
except PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0.0.0"
