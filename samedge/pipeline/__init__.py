"""The main job (``run``) and its precision step (``precision``, ``selection``, ``timing``).

Nothing is re-exported here: ``timing`` serves the benchmarks without pulling in the exporter
(and torch) that ``run`` needs.
"""
