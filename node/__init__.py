"""node role."""
