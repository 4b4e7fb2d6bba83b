"""Dropout under vmap (placeholder: no substitution registered yet)."""
