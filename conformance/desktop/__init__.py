"""Desktop-bridge protocol scenarios, runnable against any ScaiLink: `python -m conformance.desktop`."""
