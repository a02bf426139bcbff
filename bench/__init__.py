"""Benchmarks: speed, memory, learning and robustness measurements writing JSON to bench/results/.

A package (``python -m bench.grid …`` from the repository root, or ``python bench/grid.py …`` with
the project installed), so its modules import each other as ``bench.<module>`` and nothing adds to
``sys.path``. It sits at the top of the import direction (cvpo → core → api | worker → service →
bench) and imports nothing from tests/. ``bench/synthetic.py`` builds the random-weight policy
artefacts that both the benchmarks and the API tests use.
"""
