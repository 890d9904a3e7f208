"""Wan DiT hyper-parameters and the named flavors (behaviour declared as data).

Wan2.1 (T2V 1.3B / 14B) and Wan2.2-TI2V-5B share one architecture: the same modules, parameter
names, RoPE (theta 10000), qk RMSNorm, cross-attention norm and eps 1e-6. The 5B differs in
sizes only, and in its 48 latent channels (the Wan2.2 VAE's z_dim). TI2V's image conditioning is
not a module: the first latent frame is held clean and its tokens get timestep 0 (per-frame or
per-token timesteps, see `CausalWanDiT.forward`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    num_heads: int = 12
    num_layers: int = 30
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if tuple(self.patch_size) != (1, 2, 2):
            raise ValueError(f"patch_size must be (1, 2, 2) for chunk-causal training, got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Wan config keys {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    def replace(self, **kw) -> WanConfig:
        return replace(self, **kw)


FLAVORS: dict[str, WanConfig] = {
    # Tiny, for CPU tests and the demo: 2 layers, 4 heads of 16.
    "debug": WanConfig(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, freq_dim=32),
    # Wan2.1-T2V-1.3B.
    "1.3B": WanConfig(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960),
    # Wan2.1-T2V-14B.
    "14B": WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824),
    # Tiny, shaped like the 5B (48 latent channels, the Wan2.2 VAE's), for CPU tests.
    "wan2.2-debug": WanConfig(
        dim=64,
        num_heads=4,
        num_layers=2,
        ffn_dim=128,
        in_channels=48,
        out_channels=48,
        text_dim=32,
        freq_dim=32,
    ),
    # Wan2.2-TI2V-5B (wan/configs/wan_ti2v_5B.py; diffusers' Wan2.2-TI2V-5B-Diffusers transformer).
    "5B": WanConfig(dim=3072, num_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48),
}


def flavor(name: str) -> WanConfig:
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; known: {', '.join(FLAVORS)}")
    return FLAVORS[name]
