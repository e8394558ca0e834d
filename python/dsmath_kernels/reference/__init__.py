"""Plain PyTorch references: the specification of every op, readable, with shape comments. Tests use them as the
oracle and benches as the baseline. Letters: T tokens, E experts, K top-k, H hidden, I expert intermediate,
V vocab, B batch, G group size, D head dim."""

from dsmath_kernels.reference.routing import route_topk_ref

__all__ = ["route_topk_ref"]
