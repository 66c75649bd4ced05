"""Tests of digitserve.server."""
