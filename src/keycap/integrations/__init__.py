"""Framework integrations (the only modules that know HTTP)."""
