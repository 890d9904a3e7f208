"""Standalone DMD LoRA: export -> load equals the in-training generator, merge, wrong base."""

from __future__ import annotations

import json

import pytest
import torch

from vidtrain.lora import roles as lora
from vidtrain.lora.files import export_lora, load_lora, main, merge_lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import save_vidtrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base saved as the teacher and a peft model whose `dmd` adapter is non-trivial."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dmd_export")
    base = CausalWanDiT.from_flavor("debug")
    save_vidtrain(base, root / "teacher")
    model = lora.add_roles(
        CausalWanDiT.from_pretrained(str(root / "teacher")), 4, 8.0, ["q", "k", "v", "o", "ffn.0"]
    )
    with torch.no_grad():
        for p in lora.adapter_params(model, "dmd").values():
            p.normal_(0, 0.05)
        for p in lora.adapter_params(model, "critic").values():
            p.normal_(0, 0.05)
    export_lora(model, root / "lora", teacher=str(root / "teacher"))
    return root, model


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 3, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g)


def forward(model, x, t, ctx):
    from vidtrain.tokens import MaskRule

    with torch.no_grad():
        return model(x, t, ctx, rule=MaskRule("causal", 3))


def test_export_layout(trained):
    root, _ = trained
    files = sorted(p.name for p in (root / "lora").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "vidtrain_base.json"]
    cfg = json.loads((root / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    info = json.loads((root / "lora" / "vidtrain_base.json").read_text())
    assert info["base_sha256"] == lora.base_fingerprint(CausalWanDiT.from_pretrained(str(root / "teacher")))


def test_loaded_lora_equals_training_generator(trained):
    root, model = trained
    x, t, ctx = inputs()
    with lora.use_role(model, "dmd"):
        want = forward(model, x, t, ctx)
    with lora.use_role(model, None):
        teacher_out = forward(model, x, t, ctx)
    loaded = load_lora(CausalWanDiT.from_pretrained(str(root / "teacher")), root / "lora")
    got = forward(loaded, x, t, ctx)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, teacher_out), "the adapter must change the output"


def test_merge_equals_adapter_forward(trained, tmp_path):
    root, model = trained
    x, t, ctx = inputs()
    with lora.use_role(model, "dmd"):
        want = forward(model, x, t, ctx)
    merged = merge_lora(CausalWanDiT.from_pretrained(str(root / "teacher")), root / "lora")
    assert isinstance(merged, CausalWanDiT)
    torch.testing.assert_close(forward(merged, x, t, ctx), want, rtol=1e-4, atol=1e-5)
    out = tmp_path / "merged"
    assert main(["--base", str(root / "teacher"), "--lora", str(root / "lora"), "--out", str(out)]) == 0
    torch.testing.assert_close(
        forward(CausalWanDiT.from_pretrained(str(out)), x, t, ctx), want, rtol=1e-4, atol=1e-5
    )


def test_wrong_base_is_a_clear_error(trained):
    root, _ = trained
    other = CausalWanDiT.from_pretrained(str(root / "teacher"))
    with torch.no_grad():
        other.blocks[0].ffn[0].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="wrong base"):
        load_lora(other, root / "lora")
    with pytest.raises(ValueError, match="different model config"):
        load_lora(CausalWanDiT.from_flavor("debug", num_layers=3), root / "lora")
    with pytest.raises(FileNotFoundError, match="not a vidtrain LoRA"):
        load_lora(other, root)


def test_merge_cli_errors(tmp_path):
    from vidtrain.cli import main as cli

    assert (
        cli(
            ["merge", "--base", str(tmp_path), "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
        )
        == 2
    )


@pytest.fixture(scope="module")
def qat_base(trained):
    """The teacher saved as a QAT checkpoint: some linears listed in quant.json (NVFP4 fake-quant)."""
    from vidtrain.quant.qat import QUANT_RECORD, apply_quant_record

    root, _ = trained
    folder = root / "qat"
    save_vidtrain(CausalWanDiT.from_pretrained(str(root / "teacher")), folder)
    names = ["blocks.0.self_attn.q", "blocks.0.ffn.0", "blocks.1.cross_attn.o"]
    (folder / QUANT_RECORD).write_text(json.dumps({"format": "nvfp4", "linears": names}))

    def load():
        m = CausalWanDiT.from_pretrained(str(folder))
        assert apply_quant_record(m, folder)
        return m

    return folder, names, load


def test_lora_of_nvfp4_base_needs_that_base(trained, qat_base, tmp_path):
    root, _ = trained
    folder, names, load = qat_base
    model = lora.add_roles(load(), 4, 8.0, ["q", "k", "v", "o", "ffn.0"])
    with torch.no_grad():
        for p in lora.adapter_params(model, "dmd").values():
            p.normal_(0, 0.05)
    export_lora(model, tmp_path / "lora", teacher=str(folder))
    info = json.loads((tmp_path / "lora" / "vidtrain_base.json").read_text())
    assert info["nvfp4_linears"] == sorted(names)
    assert json.loads((root / "lora" / "vidtrain_base.json").read_text())["nvfp4_linears"] == []
    with pytest.raises(ValueError, match=r"NVFP4 fake-quant base.*QAT checkpoint"):
        load_lora(CausalWanDiT.from_pretrained(str(folder)), tmp_path / "lora")  # unconverted
    x, t, ctx = inputs()
    with lora.use_role(model, "dmd"):
        want = forward(model, x, t, ctx)
    torch.testing.assert_close(forward(load_lora(load(), tmp_path / "lora"), x, t, ctx), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantized"):
        main(["--base", str(folder), "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_merge_refuses_quantized_base(trained, qat_base, tmp_path):
    root, _ = trained
    folder, _, load = qat_base
    with pytest.raises(ValueError, match=r"quantized.*--lora"):
        main(["--base", str(folder), "--lora", str(root / "lora"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(load(), root / "lora")


@pytest.fixture(scope="module")
def qat_lora(trained, qat_base, tmp_path_factory):
    """A LoRA distilled on the QAT base (the pipeline's DMD stage: the QAT model is the teacher)."""
    folder, _, load = qat_base
    model = lora.add_roles(load(), 4, 8.0, ["q", "k", "v", "o", "ffn.0"])
    with torch.no_grad():
        for p in lora.adapter_params(model, "dmd").values():
            p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("qat_lora") / "lora"
    export_lora(model, out, teacher=str(folder))
    with lora.use_role(model, "dmd"):
        want = forward(model, *inputs())
    return out, want


def test_merge_requantize_keeps_the_nvfp4_record(qat_base, qat_lora, tmp_path, capsys):
    from vidtrain.quant.qat import QUANT_RECORD, apply_quant_record

    folder, names, load = qat_base
    lora_dir, want = qat_lora
    out = tmp_path / "merged"
    assert main(["--base", str(folder), "--lora", str(lora_dir), "--out", str(out), "--requantize"]) == 0
    assert json.loads((out / QUANT_RECORD).read_text())["linears"] == names
    record = json.loads((out / "merge.json").read_text())
    assert record["requantized"] is True and 0 < record["probe_max_rel_deviation"] < 0.2
    printed = capsys.readouterr().out
    assert "NVFP4 record kept" in printed, printed
    # the saved folder samples exactly as the in-memory requantized merge
    in_memory = merge_lora(load(), lora_dir, requantize=True)
    saved = CausalWanDiT.from_pretrained(str(out))
    assert apply_quant_record(saved, out)
    torch.testing.assert_close(forward(saved, *inputs()), forward(in_memory, *inputs()), rtol=0, atol=0)
    # not exact: the LoRA's high-precision path is now quantized with the weights
    dev = (forward(saved, *inputs()) - want).abs().max() / want.abs().max()
    assert 0 < dev < 0.2


def test_merge_names_the_right_base_for_a_qat_lora(trained, qat_lora, tmp_path):
    root, _ = trained
    lora_dir, _ = qat_lora
    with pytest.raises(ValueError, match=r"distilled on an NVFP4.*high-precision checkpoint.*--requantize"):
        main(["--base", str(root / "teacher"), "--lora", str(lora_dir), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_the_readme_merge_example_runs(qat_base, qat_lora, tmp_path):
    """The README's `vidtrain merge` line, with its run folders replaced by debug-size ones of
    the same kind (the QAT run as base, the DMD run's lora/)."""
    import re
    import shlex
    from pathlib import Path

    from vidtrain.cli import main as cli

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if ln.startswith("vidtrain merge ")]
    assert lines, "README shows a vidtrain merge command"
    folder, _, _ = qat_base
    lora_dir, _ = qat_lora
    for line in lines:
        args = shlex.split(line)[1:]
        base = args[args.index("--base") + 1]
        assert re.search(r"qat", base), "the README merges into the pipeline's QAT run"
        args[args.index("--base") + 1] = str(folder)
        args[args.index("--lora") + 1] = str(lora_dir)
        args[args.index("--out") + 1] = str(tmp_path / "out")
        assert cli(args) == 0


def test_lora_of_an_fp8_base_needs_that_base(trained, tmp_path, capsys):
    """A LoRA distilled on an FP8 QAT base records its FP8 linears: loading it on the unconverted
    base, or merging it into a high-precision one, is refused; merging into the FP8 base needs
    --requantize and keeps the FP8 record."""
    from vidtrain.quant.qat import QUANT_RECORD, apply_quant_record

    root, _ = trained
    folder = tmp_path / "fp8"
    save_vidtrain(CausalWanDiT.from_pretrained(str(root / "teacher")), folder)
    names = ["blocks.0.ffn.0", "blocks.0.self_attn.q"]
    (folder / QUANT_RECORD).write_text(
        json.dumps({"format": "fp8", "recipe": "tensorwise", "linears": names})
    )

    def load():
        m = CausalWanDiT.from_pretrained(str(folder))
        assert apply_quant_record(m, folder)
        return m

    model = lora.add_roles(load(), 4, 8.0, ["q", "k", "v", "o", "ffn.0"])
    with torch.no_grad():
        for p in lora.adapter_params(model, "dmd").values():
            p.normal_(0, 0.05)
    export_lora(model, tmp_path / "lora", teacher=str(folder))
    info = json.loads((tmp_path / "lora" / "vidtrain_base.json").read_text())
    assert info["fp8_linears"] == names and info["nvfp4_linears"] == []
    with pytest.raises(ValueError, match=r"FP8 fake-quant base.*QAT checkpoint"):
        load_lora(CausalWanDiT.from_pretrained(str(folder)), tmp_path / "lora")  # unconverted
    x, t, ctx = inputs()
    with lora.use_role(model, "dmd"):
        want = forward(model, x, t, ctx)
    torch.testing.assert_close(forward(load_lora(load(), tmp_path / "lora"), x, t, ctx), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(load(), tmp_path / "lora")
    with pytest.raises(ValueError, match=r"distilled on an FP8.*high-precision checkpoint"):
        main(
            ["--base", str(root / "teacher"), "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "m")]
        )
    out = tmp_path / "merged"
    assert (
        main(["--base", str(folder), "--lora", str(tmp_path / "lora"), "--out", str(out), "--requantize"])
        == 0
    )
    record = json.loads((out / QUANT_RECORD).read_text())
    assert record["format"] == "fp8" and sorted(record["linears"]) == names
    assert "FP8 record kept" in capsys.readouterr().out
