"""dsmath: a DeepSeekMath-V2-style math reasoner — MoE kernels, model, generation engine, GRPO trainer.

After `pip install .` everything lives under this one name, so nothing generic (`model`, `train`) lands in
site-packages where it would shadow, or be shadowed by, a user's own `model.py`:

    from dsmath.model import LLM, SamplingParams, MoEForCausalLM    # the repo's model/ folder
    from dsmath.train import rewards                                # the repo's train/ folder
    import dsmath_kernels as dk                                     # the kernel library (python/dsmath_kernels)

From a source checkout the same code is importable as `model` and `train` from the repo root (the layout the
tests and `python -m train.grpo` use). The `dsmath` command (dsmath.cli) lists the entry points."""

__version__ = "0.1.0"
