"""Faces: the CLI (and later the MCP server and the TUI). They import only the public API."""
