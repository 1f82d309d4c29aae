"""execmon: watch many remote executions on a rate-limited API and deliver every result."""

__version__ = "0.1.0"
