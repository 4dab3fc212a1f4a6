"""Benchmark reporting: ``python -m fastlocal.bench.report RESULTS.json --out DIR`` turns the
pytest-benchmark JSON of the ``bench/`` suite into a Markdown table and PNG plots."""
