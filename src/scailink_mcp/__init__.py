"""ScaiLink MCP: one aggregating MCP server in front of desktop and hosted MCP tool servers."""

__version__ = "0.1.0"
