"""The composition root: every plugin module is imported here, and registers itself.

Registries (`STRATEGIES`, `METHODS`, `QUANTIZERS`, flavors) never import their plugins; the
first lookup of a name a registry does not hold imports this module (vidtrain/__init__.py sets
that up). A new strategy, method or quantizer is one new module plus one line below.
"""

from vidtrain.distill import method as _dmd  # noqa: F401  ("dmd")
from vidtrain.parallel import deepspeed_strategy as _deepspeed  # noqa: F401  ("deepspeed")
from vidtrain.parallel import strategies as _strategies  # noqa: F401  ("ddp", "fsdp")
from vidtrain.train import qat_method as _qat  # noqa: F401  ("qat")
