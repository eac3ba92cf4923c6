"""Benchmarks as library functions: `attention` (speed, memory) and `approx` (approximation error).

The `sbtrain bench ...` command prints their rows as tables and writes them as JSON.
"""
