"""crgate api edge (built in a later issue)."""
