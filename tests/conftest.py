"""Test-wide settings: one BLAS/torch thread (2-core machines are 100x slower with 2), float64 defaults off, a
fixed hypothesis profile."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

# property tests draw the same examples on every run (CI and local alike): a failure reproduces, a pass is not luck;
# HYPOTHESIS_PROFILE=explore draws fresh examples (and keeps failures in the local database)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
