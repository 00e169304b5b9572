"""crgate worker edge (built in a later issue)."""
