"""crgate scp edge (built in a later issue)."""
