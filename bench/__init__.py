"""Benchmarks of quebert; see ``bench/README.rst``."""
