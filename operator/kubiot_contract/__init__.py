"""kubiot's device contract: topics, broker usernames and client ids, access rules, the telemetry
payload and firmware job states.

Both the operator and the ingest service depend on this package and nothing here depends on
them; it needs only pydantic, so each image installs only what its own process imports.
"""
