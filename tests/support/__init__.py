"""Helpers shared by the tests: waiting for conditions and starting real servers."""
