"""Running kubiot without Kubernetes: local servers and the local reconcile loop."""
