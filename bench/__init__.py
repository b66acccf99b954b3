"""Benchmarks: ScaiLink side by side with a direct SDK connection, in the same run, as ratios."""
