"""The ScaiLink desktop bridge: reference client and the server side of the WebSocket protocol."""
