"""LoRA adapters on one base model: the named roles (`roles.py`: generator `dmd`, `critic`,
teacher = adapters off) and the standalone LoRA files (`files.py`: export, load on a base,
merge, `vidtrain merge`). Used by the DMD method (vidtrain/distill) and by the sampler
(vidtrain/sample), which therefore do not import each other's LoRA code."""
