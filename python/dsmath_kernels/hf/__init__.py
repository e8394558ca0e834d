"""dsmath kernels inside Hugging Face transformers models (and TRL): `patch(model)` swaps the MoE router, the
routed experts and the causal-LM loss of a loaded model for dsmath's kernels; `patch_class(model_type)` does it
before loading. transformers is imported only when a patcher is called (the kernel library never needs it)."""

from dsmath_kernels.hf.patching import (
    PatchReport,
    UnsupportedModelError,
    patch,
    patch_class,
    unpatch,
    unpatch_class,
)
from dsmath_kernels.hf.trl_grpo import grpo_compute_loss

__all__ = ["PatchReport", "UnsupportedModelError", "patch", "patch_class", "unpatch", "unpatch_class",
           "grpo_compute_loss"]
