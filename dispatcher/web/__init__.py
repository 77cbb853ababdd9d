"""HTTP faces of the dispatcher over the management layer."""
