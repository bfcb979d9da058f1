"""The main job (``run``) and its precision step (``precision``; timing and the default's rule
live in :mod:`samedge.speed`). Nothing is re-exported: importing a submodule should not pull in
the exporter (and torch) that ``run`` needs."""
