"""The load tester: ``python -m eval.loadtest`` (see :mod:`eval.loadtest.cli` for the options).

Modules: :mod:`~eval.loadtest.cli` (command line and run), :mod:`~eval.loadtest.load` (the load shapes and the
sending loop), :mod:`~eval.loadtest.prompts` (prompt sets), :mod:`~eval.loadtest.targets` (what is loaded:
an HTTP server or an in-process cascade), :mod:`~eval.loadtest.sim` and :mod:`~eval.loadtest.simbackends`
(the simulated cascade and its backends), :mod:`~eval.loadtest.serve` (``cascade serve`` over simulated
tiers), :mod:`~eval.loadtest.stats` (percentiles and per-request records), :mod:`~eval.loadtest.report`.
"""
