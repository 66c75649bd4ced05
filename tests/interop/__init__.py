"""Third-party tools against the server."""
