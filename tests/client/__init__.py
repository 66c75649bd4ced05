"""Tests of digitserve.client."""
