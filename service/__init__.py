"""The composition root: the launcher that starts Redis, the worker and the API (``cvpo serve``) and the
service subcommands of the ``cvpo`` command. The only package that may import both ``api`` and ``worker``."""
