"""DMD distillation into a standalone LoRA (DESIGN section 9).

`method.py` registers the `dmd` training method; `lora.py` holds the one-base/three-roles
adapters; `rollout.py` the rollouts and score evaluations; `export.py` the LoRA export, load
and merge (`vidtrain merge`).
"""
