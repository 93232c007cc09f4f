"""MSmartCompute: custom-kernel compute engine and serving platform."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("msmartcompute")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"
