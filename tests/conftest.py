"""Shared test set-up: CPU first, deterministic, wandb off, GPU tests skipped without CUDA."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Small convolutions on a shared 2-core CPU: one intra-op thread avoids spin-wait stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A debug-flavor DiT saved once as a vidtrain model folder (read-only: the DMD tests' teacher)."""
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.models.wan.state_dict import save_vidtrain

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_vidtrain(CausalWanDiT.from_flavor("debug"), path)
    return path
