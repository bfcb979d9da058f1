"""Timing variants against each other on shared cores, and deciding which is clearly faster.

Pure logic plus a clock: the pipeline's default choice, the accuracy search's speed-aware pick
and the benchmarks all use it, so it sits below every layer that times something.
"""
