"""Helpers shared by the test suite (real git repos and servers, doubles, builders)."""
