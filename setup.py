"""vidtrain: distributed training of long autoregressive video diffusion models."""

from pathlib import Path

from setuptools import find_packages, setup

# kernels/, data_tools/ and launch/ live at the top of the repository (as the product card
# asks) but install inside the package, so they claim no generic top-level import names.
_MAPPED = {
    "vidtrain": "vidtrain",
    "vidtrain.kernels": "kernels",
    "vidtrain.data_tools": "data_tools",
    "vidtrain.launch": "launch",
}

setup(
    name="vidtrain",
    version="0.1.0",
    description="Training long autoregressive video diffusion models across many GPUs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(set(find_packages(include=["vidtrain", "vidtrain.*"])) | set(_MAPPED)),
    package_dir=_MAPPED,
    include_package_data=True,
    # the demo's trained weights (vidtrain/assets/demo/: VAE, DiT model folder, text encoder)
    package_data={"vidtrain": ["py.typed", "assets/*", "assets/**/*"]},
    install_requires=[
        # A range that a user's CUDA build also meets; the README installs the CPU 2.13.0 first.
        "torch>=2.6,<2.15",
        "numpy>=1.24",
        "deepspeed>=0.16",
        "peft>=0.13",
        "webdataset>=0.2.86",
        "decord>=0.6.0",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "wandb>=0.19.10",
        "einops>=0.8",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "safetensors>=0.4",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "import-linter>=2.1",
            "diffusers>=0.32",
            "transformers>=4.46",
            "torchao>=0.10",
            "triton>=3.1",
            "scikit-video>=1.1.11",
        ],
        # Need a CUDA toolchain: they do not build on CPU-only machines.
        "gpu": ["flash-attn>=2.6", "transformer-engine[pytorch]>=2.4", "triton>=3.1"],
    },
    entry_points={
        "console_scripts": [
            "vidtrain=vidtrain.cli:main",
            "vidtrain-shard=vidtrain.data_tools.shard:main",
            "vidtrain-encode=vidtrain.data_tools.encode:main",
            "vidtrain-inspect=vidtrain.data_tools.inspect:main",
            "vidtrain-launch=vidtrain.launch.launcher:main",
        ]
    },
)
