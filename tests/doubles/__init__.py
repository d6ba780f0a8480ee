"""In-process fakes of external HTTP APIs, shaped from shared/reference (faked at the HTTP boundary)."""
