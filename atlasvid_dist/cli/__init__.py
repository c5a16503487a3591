"""See DESIGN §4 for this layer."""
