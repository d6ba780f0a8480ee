"""Test helpers: local git repositories and a git smart-HTTP server (real git, no mocks)."""
