"""Pre-flight checks and job plans: pure decisions over identities, profiles and images."""
