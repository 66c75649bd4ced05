"""Tests of bench/'s own logic that need no server."""
