"""The service on Ray Serve: the same FastAPI app and routes as one process, with its encoders and
its store replaced by Serve deployments (`emkum serve-cluster`; docs/scaling.md is the runbook)."""
