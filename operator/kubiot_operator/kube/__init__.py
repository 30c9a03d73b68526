"""Thin adapters between kubiot and the Kubernetes API."""
