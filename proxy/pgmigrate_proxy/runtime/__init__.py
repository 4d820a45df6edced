"""The asyncio shell of the proxy: listener, client sessions, upstream connections, TLS."""
