"""Serving: wire format, cloud server, edge runner, HTTP client, link emulator and link probe."""
