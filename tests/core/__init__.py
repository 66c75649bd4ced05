"""Tests of the framework-free core: digitserve.idx, .metrics, .metadata, .repository, .config, .extras."""
