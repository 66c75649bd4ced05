"""Tests of digitserve.inference."""
