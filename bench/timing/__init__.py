"""Timing inside a worker: the clock, warm-up and sampling, statistics, op-level kernel timing."""
