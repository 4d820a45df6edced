"""The DDL pipeline: pure decisions (what to do with blockers, when to retry) apart from the I/O."""
