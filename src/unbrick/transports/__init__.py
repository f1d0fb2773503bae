"""Device transports: capability protocols, drivers, and the registry that opens them."""
