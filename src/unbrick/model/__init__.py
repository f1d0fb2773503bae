"""Pure data of the workbench: device addresses, identities, profiles, manifests."""
