"""The ``cuda`` backend: the chunked driver's CUDA C++ epilogue (epilogue.py) and sampled softmax
(sampled_softmax.py), both over kc_kernels._cuda (csrc/cuda, built where nvcc exists). What runs where:
kc_kernels/dispatch.py."""
