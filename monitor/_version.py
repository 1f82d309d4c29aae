"""The package version, in the base layer so that core modules (the store, the webhook sink) can name it
without importing the `monitor` facade; `monitor.__version__` re-exports it."""

__version__ = "0.1.0"
