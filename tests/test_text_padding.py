"""Padded text (issue 15): Wan2.1's caption convention by default, the masked variant on request.

Wan2.1 (its own code and diffusers' WanPipeline) zero-pads the umT5 states to a fixed length
and passes no mask, so the pads enter cross-attention as text_embedding(0). `model.text_padding`
(`wan` default, `masked`) and `model.text_len` decide the context; collate, teacher forcing,
the sampler and DMD use the one function `vidtrain.models.text.text_context`.
"""

from __future__ import annotations

import json
import typing

import pytest
import torch
import yaml

from vidtrain import config
from vidtrain.config import ConfigError, ModelConfig, load_recipe, validate
from vidtrain.data.latents import collate_latents, latent_collate
from vidtrain.data.videos import VideoBatchEncoder
from vidtrain.data_tools import encode
from vidtrain.distill.method import DMD
from vidtrain.forcing.teacher import build_tf_sequence, noisy_prediction_frames
from vidtrain.lora import files
from vidtrain.models import text as text_mod
from vidtrain.models.text import TextEncoder, make_tiny_text_encoder, text_context
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.sample.cli import shot_conditionings
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler
from vidtrain.testing.equality import debug_vae
from vidtrain.tokens import MaskRule
from vidtrain.train.methods import TeacherForcing
from vidtrain.train.resume_policy import recipe_changes

diffusers = pytest.importorskip("diffusers")

FIXED = 32  # the fixed length of these tests (Wan: 512)
REAL = (1, 7, 20)  # real tokens of the captions
TEXT_DIM = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random diffusers WanTransformer3DModel and the same weights in CausalWanDiT."""
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("diffusers_wan")
    ref.eval().save_pretrained(d)
    return ref, CausalWanDiT.from_pretrained(d).eval()


def _items(lengths, dim=TEXT_DIM, seed=1):
    """Latent-shard items as the reader yields them: text of each caption's true length."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents": torch.randn(4, 3, 4, 4, generator=g),
            "text": torch.randn(n, dim, generator=g),
            "key": str(i),
        }
        for i, n in enumerate(lengths)
    ]


def _zero_padded(items, length):
    """Wan's pipeline: each caption's states, then zeros up to `length` (built independently)."""
    out = torch.zeros(len(items), length, items[0]["text"].shape[1])
    for b, it in enumerate(items):
        out[b, : len(it["text"])] = it["text"]
    return out


def test_default_equals_diffusers_unmasked_and_masked_equals_real_tokens_only(pair, capsys):
    ref, ours = pair
    items = _items(REAL)
    x, t = torch.stack([it["latents"] for it in items]), torch.tensor([100.0, 500.0, 900.0])
    recipe = load_recipe(None, [f"model.text_len={FIXED}"])
    assert recipe.model.text_padding == "wan"  # the default
    wan = latent_collate(recipe.model)(items)
    assert wan["text"].shape == (3, FIXED, TEXT_DIM) and wan["text_mask"] is None
    with torch.no_grad():
        want = ref(x, t, _zero_padded(items, FIXED), return_dict=False)[0]  # no mask: Wan's convention
        got = ours(x, t, wan["text"], context_mask_BS=wan["text_mask"])
        masked = collate_latents(items, "masked", FIXED)
        got_masked = ours(x, t, masked["text"], context_mask_BS=masked["text_mask"])
        # the masked option: exactly a forward on the real tokens only (each caption alone)
        alone = torch.cat([ours(x[b : b + 1], t[b : b + 1], it["text"][None]) for b, it in enumerate(items)])
        ref_alone = torch.cat(
            [
                ref(x[b : b + 1], t[b : b + 1], it["text"][None], return_dict=False)[0]
                for b, it in enumerate(items)
            ]
        )
    err = (got - want).abs().max().item()
    gap = (got_masked - want).abs().amax(dim=(1, 2, 3, 4))
    with capsys.disabled():
        print(
            f"\n[text padding] wan vs diffusers unmasked, fp32: max abs {err:.2e}; masked vs diffusers "
            f"zero-padded, per caption of {REAL} real tokens in {FIXED}: max abs "
            f"{', '.join(f'{g:.3f}' for g in gap.tolist())} (relative "
            f"{((got_masked - want).norm() / want.norm()).item():.3f})"
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert (gap > 1e-2).all()  # the masked option is another model input
    torch.testing.assert_close(got_masked, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, ref_alone, rtol=1e-5, atol=5e-5)
    assert masked["text"].shape == (3, max(REAL), TEXT_DIM) and masked["text_mask"].sum(1).tolist() == list(
        REAL
    )


def test_collate_pads_to_the_fixed_length_with_zeros_and_truncates_once(monkeypatch, capsys):
    monkeypatch.setattr(text_mod, "_truncation_said", False)
    items = _items((*REAL, FIXED + 8))
    batch = collate_latents(items, "wan", FIXED)
    assert batch["text"].shape == (4, FIXED, TEXT_DIM) and batch["text_mask"] is None
    for b, it in enumerate(items):
        n = min(len(it["text"]), FIXED)
        assert torch.equal(batch["text"][b, :n], it["text"][:n]) and torch.all(batch["text"][b, n:] == 0)
    err = capsys.readouterr().err
    assert (
        err.count("warning") == 1
        and f"caption of {FIXED + 8} tokens" in err
        and f"truncated to {FIXED}" in err
    )
    collate_latents(items, "masked", FIXED)  # said once per process
    assert "warning" not in capsys.readouterr().err
    masked = collate_latents(items, "masked", FIXED)
    assert masked["text"].shape == (4, FIXED, TEXT_DIM) and masked["text_mask"].sum(1).tolist() == [
        1,
        7,
        20,
        FIXED,
    ]
    # the default collate is Wan's: 512 tokens, no mask
    assert collate_latents(items[:1])["text"].shape == (1, config.TEXT_LEN, TEXT_DIM)
    # idempotent: a context text_context made comes back unchanged (the methods apply it again)
    again, mask = text_context(batch["text"], None, "wan", FIXED)
    assert torch.equal(again, batch["text"]) and mask is None
    again, mask = text_context(masked["text"], masked["text_mask"], "masked", FIXED)
    assert torch.equal(again, masked["text"]) and torch.equal(mask, masked["text_mask"])


def _stream_vs_teacher_forcing(model, cfg: SamplerConfig, cond, text_tf, mask_tf):
    """The sampler's velocities (full history) against the teacher-forced forward of the same
    chunks with the training side's context."""
    res = StreamingSampler(model, cfg).generate_latents([cond], [2], (4, 4), [1, 2], trace=True)
    x0, f = res.latents_BCFHW, res.latents_BCFHW.shape[2]
    for step in range(len(cfg.timesteps)):
        xt = torch.cat([ch.trace[step]["x_t"] for ch in res.chunks], dim=2)
        sigma = torch.tensor([ch.trace[step]["t"] / 1000 for ch in res.chunks]).repeat_interleave(3)
        sigma_BF = sigma[None].expand(2, -1)
        noise = (xt - (1 - sigma_BF[:, None, :, None, None]) * x0) / sigma_BF[:, None, :, None, None]
        seq = build_tf_sequence(x0, noise, sigma_BF, 3)
        attn = AttentionContext(rule=MaskRule("teacher_forcing", 3), meta=seq.meta)
        with torch.no_grad():
            pred = model(seq.x_BLP, seq.t_BL, text_tf, meta=seq.meta, attn=attn, context_mask_BS=mask_tf)
        tf = noisy_prediction_frames(pred, seq, f, 4, 4)
        v = torch.cat([ch.trace[step]["v"] for ch in res.chunks], dim=2)
        torch.testing.assert_close(v, tf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["wan", "masked"])
def test_sampler_and_teacher_forcing_see_the_same_context(padding, tmp_path):
    """Encoder states -> the encode tool's stored true-length text -> the trainer's collate and
    teacher forcing, against the same prompts through `vidtrain sample`'s conditioning
    (SamplerConfig.from_run of the recipe): the same context, the same predictions."""
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    te = TextEncoder.from_pretrained(make_tiny_text_encoder(tmp_path / "te", d_model=32), max_length=FIXED)
    prompts = ["a cat", "a red car drives along a coastal road next to the sea"]
    recipe = load_recipe(None, [f"model.text_padding={padding}", f"model.text_len={FIXED}"])
    emb, mask = te.encode(prompts)
    stored = [emb[b, :n] for b, n in enumerate(mask.sum(1).tolist())]  # what vidtrain-encode keeps
    items = [{"latents": torch.zeros(16, 6, 4, 4), "text": s, "key": str(i)} for i, s in enumerate(stored)]
    text_tf, mask_tf = TeacherForcing(recipe).caption_context(latent_collate(recipe.model)(items), "cpu")
    cfg = SamplerConfig.from_run(recipe, overrides={"kv_cache": "fp32", "timesteps": (1000.0, 500.0)})
    assert (cfg.text_padding, cfg.text_len) == (padding, FIXED)
    (cond,) = shot_conditionings([prompts], te, 32, cfg)
    assert torch.equal(cond.context_BST, text_tf)
    if padding == "wan":
        assert text_tf.shape == (2, FIXED, 32) and mask_tf is None and cond.mask_BS is None
    else:
        assert torch.equal(cond.mask_BS, mask_tf) and mask_tf.sum(1).tolist() == mask.sum(1).tolist()
    _stream_vs_teacher_forcing(model, cfg, cond, text_tf, mask_tf)
    # training straight from videos (data.source=videos) encodes the captions into the same context
    video = {"video": torch.zeros(2, 3, 1, 16, 16), "captions": prompts, "keys": ["0", "1"]}
    m = recipe.model
    from_videos = VideoBatchEncoder(debug_vae(), te, 0, m.text_padding, m.text_len)(video)
    text_v, mask_v = TeacherForcing(recipe).caption_context(from_videos, "cpu")
    assert torch.equal(text_v, cond.context_BST)
    assert (mask_v is None and cond.mask_BS is None) or torch.equal(mask_v, cond.mask_BS)
    # DMD's rollouts and scores: the same settings and the same context
    dmd = load_recipe(None, ["method.name=dmd", f"method.dmd.teacher={tmp_path}", *recipe_overrides(recipe)])
    d = DMD(dmd)
    assert (d.sampler_config.text_padding, d.sampler_config.text_len) == (padding, FIXED)
    batch = latent_collate(dmd.model)(items)
    text, m = d.caption_context(batch, "cpu")
    assert torch.equal(d.sampler_config.condition(text, m).context_BST, cond.context_BST)


def recipe_overrides(recipe) -> list[str]:
    return [f"model.text_padding={recipe.model.text_padding}", f"model.text_len={recipe.model.text_len}"]


def test_runs_and_lora_records_carry_the_setting(tmp_path):
    model = CausalWanDiT.from_flavor("debug")
    step = tmp_path / "run" / "checkpoints" / "step_000001"
    save_vidtrain(model, step / "model")
    (step / "trainer_state.pt").write_bytes(b"")
    recipe = load_recipe(None, ["model.text_padding=masked", "model.text_len=64"])
    (tmp_path / "run" / "recipe.yaml").write_text(config.dump_recipe(recipe))
    cfg = SamplerConfig.from_run(step)
    assert (cfg.text_padding, cfg.text_len) == ("masked", 64)
    # a run folder written before model.text_padding existed trained with masked pads
    old = recipe.to_dict()
    del old["model"]["text_padding"], old["model"]["text_len"]
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(old))
    lines = []
    cfg = SamplerConfig.from_run(step, log=lines.append)
    assert (cfg.text_padding, cfg.text_len) == ("masked", config.TEXT_LEN)
    assert any("text_padding=masked" in s and "before model.text_padding" in s for s in lines)
    # ... and resuming it under the new default is a change, not a silent switch
    _, unsafe = recipe_changes(old, load_recipe(None).to_dict())
    assert "model.text_padding: 'masked' -> 'wan'" in unsafe
    # a bare model folder (no recipe): Wan's convention
    bare = save_vidtrain(model, tmp_path / "bare")
    assert (SamplerConfig.from_run(bare).text_padding, SamplerConfig.from_run(bare).text_len) == ("wan", 512)
    # a DMD LoRA's record (the dmd method writes the run's text settings into it) decides over the run
    lora = tmp_path / "lora"
    lora.mkdir()
    for name in (files.CONFIG_FILE, files.WEIGHTS_FILE):
        (lora / name).write_text("")
    (lora / files.BASE_FILE).write_text(json.dumps({"text_padding": "masked", "text_len": 48}))
    cfg = SamplerConfig.from_run(bare, lora)
    assert (cfg.text_padding, cfg.text_len) == ("masked", 48)


def test_one_default_and_clear_errors(tmp_path, monkeypatch, capsys):
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["text_padding"]) == config.TEXT_PADDINGS
    r = load_recipe(None)
    assert r.model.text_padding == SamplerConfig.text_padding == config.TEXT_PADDING == "wan"
    assert r.model.text_len == SamplerConfig.text_len == config.TEXT_LEN == 512
    with pytest.raises(ConfigError, match=r"model.text_padding: 'pad' is not one of 'wan', 'masked'"):
        load_recipe(None, ["model.text_padding=pad"])
    r.model.text_padding = "pad"  # a recipe changed in code: validate says the same
    with pytest.raises(ConfigError, match=r"model.text_padding 'pad' is not one of 'wan', 'masked'"):
        validate(r)
    with pytest.raises(ConfigError, match=r"model.text_len must be an integer >= 1, got 0"):
        load_recipe(None, ["model.text_len=0"])
    with pytest.raises(ValueError, match="text_padding 'x' is not one of"):
        SamplerConfig(text_padding="x")
    with pytest.raises(ValueError, match="text_padding 'x' is not one of"):
        text_context(torch.zeros(1, 2, 3), None, "x", 4)
    with pytest.raises(ValueError, match="does not fit the text context"):
        text_context(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), "wan", 4)
    # a caption longer than the text length: truncated, said once (one line)
    monkeypatch.setattr(text_mod, "_truncation_said", False)
    te = TextEncoder.from_pretrained(make_tiny_text_encoder(tmp_path / "te", d_model=32), max_length=6)
    capsys.readouterr()
    long = "people ride bikes down a busy city street on a sunny day"
    emb, mask = te.encode([long, "a cat"])
    assert emb.shape == (2, 6, 32) and mask[0].all()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a caption of 13 tokens is longer than the 6-token text context" in err[0]
    te.encode([long])
    assert capsys.readouterr().err == ""
    # the encode tool keeps at most --max-text-len tokens per caption: it must be >= 1
    assert (
        encode.main([str(tmp_path), str(tmp_path / "out"), "--tiny-text-encoder", "--max-text-len", "0"]) == 2
    )
    assert capsys.readouterr().err.strip().endswith("--max-text-len must be >= 1, got 0")
