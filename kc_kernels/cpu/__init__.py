"""The ``cpu`` backend: the chunked driver's C++/OpenMP epilogue (epilogue.py) and sampled softmax
(sampled_softmax.py), both over kc_kernels._C (csrc/cpu). What runs where: kc_kernels/dispatch.py."""
