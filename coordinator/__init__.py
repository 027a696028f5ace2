"""coordinator role."""
