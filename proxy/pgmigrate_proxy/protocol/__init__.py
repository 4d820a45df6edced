"""Sans-IO PostgreSQL wire protocol: message types, framing, codecs and session state."""
