"""Celery adapter around the cvpo engine, and the job store shared with the API.

Filled in by the "Training service" issue.
"""
