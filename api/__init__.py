"""The REST API (FastAPI): routes, schemas, auth, errors and the /act hot path. It never trains.

Filled in by the "Training service" and "Policy serving" issues.
"""
