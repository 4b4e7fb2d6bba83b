"""BatchNorm under vmap (placeholder: no substitution registered yet)."""
