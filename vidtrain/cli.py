"""`vidtrain train|sample|convert|balance|merge|eval|plan ...` — one console script, subcommands.

User errors (bad recipe, missing file, shapes that do not fit) print one clear line and exit 2;
a traceback is shown only with VIDTRAIN_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vidtrain.utils import quiet

# subcommand -> module whose `main(argv)` handles it (imported lazily: `vidtrain --help` stays fast)
DELEGATED = {
    "sample": ("vidtrain.sample.cli", "stream a multi-shot video from a checkpoint"),
    "eval": ("vidtrain.sample.evaluate", "sample a prompt list with several checkpoints, write a table"),
    "balance": ("vidtrain.parallel.balance", "per-rank balance report of a sequence-parallel layout"),
    "merge": ("vidtrain.lora.files", "fold a DMD LoRA into its base model"),
    "plan": ("vidtrain.plan", "a recipe's memory and step time per rank on fake tensors (no GPU)"),
}


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain train",
        description="Train from a recipe YAML.",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = p.parse_args(argv)
    # lazy: the trainer (torch, deepspeed, ...) only when training: `vidtrain --help` stays fast
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = train(recipe)
    if trainer.strategy.is_main:
        print(f"[vidtrain] run folder: {recipe.run.dir} (checkpoints/, metrics.jsonl, loss.png)")
    return 0


def _convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain convert",
        description="Convert Wan2.1 / Wan2.2-TI2V-5B DiT weights (original or diffusers layout) to vidtrain's "
        "format; the flavor is read off the weights.",
    )
    p.add_argument(
        "src", help="folder with a Wan2.1 / Wan2.2 original or diffusers WanTransformer3DModel checkpoint"
    )
    p.add_argument("dst", help="output folder (written atomically)")
    args = p.parse_args(argv)
    # lazy: torch only when converting (`vidtrain --help` stays fast)
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.models.wan.state_dict import save_vidtrain

    model = CausalWanDiT.from_pretrained(args.src)
    save_vidtrain(model, args.dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"[vidtrain] wrote {args.dst} ({n / 1e6:.1f}M parameters)")
    return 0


LOCAL = {"train": (_train, "train from a recipe YAML"), "convert": (_convert, "convert Wan2.1 weights")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet.install()
    commands = {k: v[1] for k, v in LOCAL.items()} | {k: v[1] for k, v in DELEGATED.items()}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vidtrain <command> [args]\n\ncommands:")
        for name, doc in commands.items():
            print(f"  {name:9s} {doc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in commands:
        print(f"vidtrain: unknown command {cmd!r}; known: {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        if cmd in LOCAL:
            return LOCAL[cmd][0](rest)
        return int(importlib.import_module(DELEGATED[cmd][0]).main(rest) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("VIDTRAIN_DEBUG"):
            raise
        print(f"vidtrain {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
