"""Tests of digitserve.trainer."""
