"""Text encoder wrapper: a umT5 / T5 encoder and its tokenizer from a local folder.

Wan2.1 conditions on umT5-XXL encoder states of 512 tokens, zero past the caption's last
token, with no mask (its own code and diffusers' pipeline): the pads enter cross-attention as
`text_embedding(0)`. `TextEncoder.encode` gives `(emb_BLD, mask_BL)`, padded or truncated to
`max_length`, with padded rows set to zero; `text_context` turns encoder states into the context
a recipe's `model.text_padding` asks for (`wan`: exactly that; `masked`: pads hidden by a mask),
the one function training, the sampler and DMD use. A caption longer than the context is
truncated, said once per process. Folders accepted: a Hugging Face encoder folder holding the
tokenizer too, or a diffusers pipeline folder with `text_encoder/` and `tokenizer/`. Nothing is
downloaded.

`make_tiny_text_encoder(path, d_model=32)` writes a small random umT5 encoder plus a word-piece
tokenizer trained offline with `tokenizers`, for tests and CPU demos.

Legend: B batch, L tokens, D model width.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch
from torch import nn

from vidtrain.config import TEXT_LEN, TEXT_PADDING, TEXT_PADDINGS

_TINY_CORPUS = (
    "a rabbit walks through a green forest in the morning light",
    "people ride bikes down a busy city street on a sunny day",
    "a man talks on the phone inside a moving car",
    "the camera pans slowly across mountains covered in snow",
    "waves crash on a rocky beach at sunset while birds fly above",
    "a cat jumps onto a wooden table and looks at the camera",
    "close up of rain drops falling on a window at night",
    "a red car drives along a coastal road next to the sea",
)


_truncation_said = False  # the truncation warning is printed once per process


def warn_truncated(tokens: int, length: int) -> None:
    """One line, once per process: a caption of `tokens` tokens cut to the `length`-token context."""
    global _truncation_said
    if not _truncation_said:
        _truncation_said = True
        print(
            f"[vidtrain] warning: a caption of {tokens} tokens is longer than the {length}-token text "
            f"context (model.text_len): truncated to {length} tokens (said once per process)",
            file=sys.stderr,
        )


def text_context(
    text_BLD: torch.Tensor,
    mask_BL: torch.Tensor | None = None,
    padding: str = TEXT_PADDING,
    length: int = TEXT_LEN,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The caption context the model takes, and the cross-attention mask to pass with it.

    `text_BLD`: encoder states, each caption's real tokens first; `mask_BL` marks them (None:
    every row is real). Rows past a caption are set to zero; a caption longer than `length` is
    truncated (`warn_truncated`).
      wan:    [B, length, D] zero-padded, mask None (Wan2.1: the pads attend as text_embedding(0));
      masked: [B, n, D] with n the longest caption (at most `length`) and its mask [B, n]
              (None when no mask was given: every row is real).
    Idempotent: a context it returned comes back unchanged."""
    if padding not in TEXT_PADDINGS:
        raise ValueError(f"text_padding {padding!r} is not one of {', '.join(map(repr, TEXT_PADDINGS))}")
    if length < 1:
        raise ValueError(f"text_len must be >= 1, got {length}")
    if text_BLD.ndim != 3:
        raise ValueError(f"text context must be [B, L, D], got {list(text_BLD.shape)}")
    b, n, d = text_BLD.shape
    if mask_BL is not None:
        if tuple(mask_BL.shape) != (b, n):
            raise ValueError(f"text mask {list(mask_BL.shape)} does not fit the text context {[b, n, d]}")
        mask_BL = mask_BL.to(device=text_BLD.device, dtype=torch.bool)
        text_BLD = text_BLD * mask_BL[..., None].to(text_BLD.dtype)
        longest = int(mask_BL.sum(1).max()) if b else 0
    else:
        longest = n
    if longest > length:
        warn_truncated(longest, length)
    if padding == "masked":
        keep = min(length, n if mask_BL is None else max(1, longest))
        return text_BLD[:, :keep], None if mask_BL is None else mask_BL[:, :keep]
    if n >= length:
        return text_BLD[:, :length], None
    pad = text_BLD.new_zeros(b, length - n, d)
    return torch.cat([text_BLD, pad], dim=1), None


def _split_folder(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of an encoder folder or a diffusers pipeline folder."""
    if (path / "text_encoder").is_dir():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        return path / "text_encoder", tok
    return path, path


class TextEncoder(nn.Module):
    """Frozen caption encoder: strings -> padded encoder states and a token mask."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 512) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> TextEncoder:
        """Load from a LOCAL folder (umT5, T5 or mT5 encoder weights + tokenizer)."""
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        path = Path(path)
        if not path.is_dir():
            raise ValueError(
                f"text encoder folder {path} does not exist (give a local folder; nothing is downloaded)"
            )
        model_dir, tok_dir = _split_folder(path)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        classes = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel, "mt5": T5EncoderModel}
        if config.model_type not in classes:
            raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not one of {sorted(classes)}")
        model = classes[config.model_type].from_pretrained(
            model_dir, torch_dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(model.to(device), tokenizer, max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions: emb_BLD (float32, zero past each caption) and mask_BL (bool)."""
        if isinstance(texts, str):
            raise ValueError("encode takes a list of strings, got one string")
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids_BL = tok["input_ids"].to(self.device)
        mask_BL = tok["attention_mask"].to(self.device).bool()
        full = [t for t, n in zip(texts, mask_BL.sum(1).tolist()) if n == self.max_length]
        if full:  # at the limit: were they cut?
            longest = max(len(ids) for ids in self.tokenizer(full, truncation=False)["input_ids"])
            if longest > self.max_length:
                warn_truncated(longest, self.max_length)
        emb_BLD = self.model(input_ids=ids_BL, attention_mask=mask_BL.long()).last_hidden_state
        emb_BLD = emb_BLD.float() * mask_BL[..., None]
        return emb_BLD, mask_BL


def _train_tiny_tokenizer(vocab_size: int):
    """Whole words learned from a small corpus plus single-character pieces, so any lowercase
    ASCII caption tokenizes without <unk>. Ids are assigned in sorted order: deterministic."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = chars + ["##" + c for c in chars]
    if vocab_size < len(specials) + len(pieces):
        raise ValueError(f"vocab_size must be >= {len(specials) + len(pieces)}, got {vocab_size}")
    words_tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words_tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words_tok.train_from_iterator(_TINY_CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    words = sorted(w for w in words_tok.get_vocab() if w not in specials and w not in chars)
    words = words[: vocab_size - len(specials) - len(pieces)]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words) | set(pieces)))}

    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.normalizer = words_tok.normalizer
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_text_encoder(
    path: str | Path,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny random umT5 encoder + tokenizer to `path` (offline) and return the path."""
    from transformers import UMT5Config, UMT5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(vocab_size)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "vidtrain_tiny.json").write_text(json.dumps({"d_model": d_model, "seed": seed}) + "\n")
    return path
