"""Benchmarks a user runs against a cluster: `pdserve bench` is the serving benchmark
(serving.py). Above every other part of the package: it starts clusters and engines."""
