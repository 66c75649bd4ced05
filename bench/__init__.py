"""Benchmarks: the null, naive and digitserve servers under the same load (``python -m bench``)."""
