"""The disk spool: segments, versioned records, replay and retention."""
