"""What the API and the worker share: the job store, settings, the broker queue, the reconciler, the
Celery app definition and certification. Imports the engine (``cvpo``), never ``api`` or ``worker``."""
