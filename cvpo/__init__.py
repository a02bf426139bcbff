"""CVPO (Constrained Variational Policy Optimization) engine for safety-gymnasium.

A library first: importable and usable with no API, worker, Redis or database. The service
(``api/``, ``worker/``) is a thin layer over it.
"""

__version__ = "0.1.0"
