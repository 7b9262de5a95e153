"""Benchmark scripts (not tests): run them from the repository root, e.g.
`.venv/bin/python -m bench.bench_s3`. See bench/README.md."""
