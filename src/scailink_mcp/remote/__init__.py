"""Hosted (remote) MCP servers: the registry, discovery, health checks and the guarded outbound client."""
