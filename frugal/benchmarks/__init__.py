"""Benchmark scripts: each times or measures something and prints what it measured as JSON."""
