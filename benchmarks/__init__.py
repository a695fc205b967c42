"""fusedlayers benchmarks (installed as ``fusedlayers.benchmarks``; run ``fusedlayers bench``).

``core``: work counts (FLOPs, bytes), timing, environment, result files.
``suite``: the cases and the competitors, run in one process on the same inputs.
Results live in ``benchmarks/results/<device>/`` (JSON, Markdown, PNG).
"""
