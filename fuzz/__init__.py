"""Fuzzers of pgmigrate_proxy: in-process harnesses of the sans-IO layers, and a socket fuzzer."""
