"""Controllers: one per kind. Each reads what exists, asks the pure `reconcile` functions what
should exist, and applies the difference through the platform's adapters (Kubernetes objects,
PKI, broker, MQTT). The kopf handlers and the local stack both drive these."""
