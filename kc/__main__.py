import os
import sys

# NumPy's BLAS (OpenBLAS) starts one thread per core, apart from torch's threads (which kc chooses): kc's only
# large NumPy GEMMs are the Bayes posterior's, whose shapes ([4096, 14] x [14, 409] float64) ran no faster on two
# threads (1.57 against 1.61 ms) for twice the CPU, and whose idle threads spin on cores that other work needs.
# Set before NumPy is first imported; a value in the environment is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from kc.cli import main  # noqa: E402 - after the environment above

sys.exit(main())
