"""CVPO (Constrained Variational Policy Optimization) engine for safety-gymnasium.

A library first: importable and usable with no API, worker, Redis or database. The service
(``api/``, ``worker/``) is a thin layer over it.
"""

import os

# NumPy's work in the engine is small (the E-step dual on a B×K problem: SciPy's L-BFGS-B and the
# Newton warm path), but OpenBLAS threads keep spinning after each call and starve torch's
# intra-op threads on a small host: on 2 cores, training ran at 222 env-steps/s with them and 351
# without (bench/vs_fsrl.py, PointCircle1). One BLAS thread unless the user chose otherwise; this
# only takes effect when ``cvpo`` is imported before NumPy, as the ``cvpo`` command does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
