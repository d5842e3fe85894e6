"""Speed benchmarks against reference implementations, each run from the repository root as
``python -m benchmarks.<name>`` (``make bench`` runs them all); ``benchmarks/README.md`` holds the
measured timings.
"""
