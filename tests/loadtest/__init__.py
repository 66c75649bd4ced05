"""Tests of digitserve.loadtest."""
