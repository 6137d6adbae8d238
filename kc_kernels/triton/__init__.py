"""The ``triton`` backend: the chunked driver's Triton epilogue (epilogue.py) and sampled softmax
(sampled_softmax.py). What runs where: kc_kernels/dispatch.py."""
