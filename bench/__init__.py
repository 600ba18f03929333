"""Benchmarks: each module is runnable (`python -m bench.<name> [--quick]`), prints a table, writes JSON under
bench/results/ and ends with a one-line JSON summary."""
