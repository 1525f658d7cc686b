"""Data preparation: task registry, source readers, validation, splits, stats, and the
`make data` entry point (finlora.data.prepare)."""
