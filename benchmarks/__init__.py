"""Benchmarks: scripts that measure, print a table and write JSON; they never pass or fail."""
