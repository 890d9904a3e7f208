"""vidtrain: training long autoregressive video diffusion models across many GPUs."""

from vidtrain import registry as _registry

__version__ = "0.1.0"


def _register_plugins() -> None:
    # lazy: the composition root; `import vidtrain` (and `vidtrain --help`) stays light
    import vidtrain.plugins  # noqa: F401


_registry.add_plugin_hook(_register_plugins)
