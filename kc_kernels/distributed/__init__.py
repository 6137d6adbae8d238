"""Vocab-parallel losses: the class dimension sharded across torch.distributed ranks.

Each rank holds a contiguous class range [lo, hi) of the output layer (its rows of weight, bias and, per class,
scale); x and the sparse targets are replicated. Every rank returns the same global loss, equal to the
single-process op on the full layer.

- sharding: the class ranges (``shard_classes``) and the segments a shard boundary cuts;
- collectives: the counted collectives, and the two autograd-aware ones (copy to ranks, sum over ranks);
- soft_target: ``vocab_parallel_linear_soft_target_loss``. Segments wholly inside a rank's range, and every
  segment in sigmoid mode without a scale, go through the public fused op; a segment cut by a shard boundary
  (split) goes through kc_kernels.portable with its row statistics all-reduced across ranks;
- sampled_softmax: ``vocab_parallel_sampled_softmax_loss``;
- accounting: the bytes of every collective, computed (``communication_bytes``) and counted
  (``count_communication``).
"""
from kc_kernels.distributed.accounting import communication_bytes, count_communication
from kc_kernels.distributed.sampled_softmax import vocab_parallel_sampled_softmax_loss
from kc_kernels.distributed.sharding import shard_classes, split_segments
from kc_kernels.distributed.soft_target import vocab_parallel_linear_soft_target_loss

__all__ = [
    "shard_classes",
    "split_segments",
    "vocab_parallel_linear_soft_target_loss",
    "vocab_parallel_sampled_softmax_loss",
    "communication_bytes",
    "count_communication",
]
