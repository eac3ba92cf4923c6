"""Benchmarks as library functions: `attention` (speed, memory) and `approx` (approximation error).

`sbtrain bench attention|approx` (the CLI) prints their rows as tables and saves them as JSON.
"""
