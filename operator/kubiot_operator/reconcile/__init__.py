"""Pure reconcile decisions: (resource, observed state, now) -> what should exist. No I/O."""
