"""DMD distillation into a standalone LoRA (DESIGN section 9).

`method.py` registers the `dmd` training method; `rollout.py` the rollouts and score
evaluations. The one-base/three-roles adapters and the LoRA files (export, load, merge,
`vidtrain merge`) live in `vidtrain/lora/`, which the sampler uses too.
"""
