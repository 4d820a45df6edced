"""Fast tests of the sans-IO protocol layer: no sockets, no server."""
