"""`swarm finetune`: train the client's own parameters (soft prompts, deep prompts, LoRA, IA3,
key/value prefixes, bottleneck adapters, the token embeddings, combinations of them, or the
client's embeddings/norm/head) through the swarm on a JSONL file, resumably.

The story of a run: read and check the data (before touching the network), look in --out for
a previous save, join the swarm, then step: batch -> forward/backward through the peers ->
AdamW. Every --save-every steps, and at the end, the state, loss curve and adapter are
written atomically (see client/apps/run_state.py). Re-running the same command carries on
from the last save; Ctrl-C finishes the current step, saves and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from swarm.initial_peers import exit_if_not_joined, initial_peers_argument
from swarm.membership.join_flag import add_join_argument, join_argument
from swarm.named_models import DEFAULT_MODEL  # no torch: --help and argument errors stay instant

from .swarm_options import add_verify

MODES = ("ptune", "deep_ptune", "embeddings", "lora", "ia3", "prefix", "bottleneck", "none")
DEFAULT_LR = {"ptune": 1e-2, "deep_ptune": 1e-2, "embeddings": 1e-4, "lora": 1e-3, "ia3": 1e-2, "prefix": 1e-2,
              "bottleneck": 1e-3, "none": 1e-5}

EPILOG = f"""\
data: a JSONL file, one example a line, either
  {{"text": "..."}}                            loss on every token
  {{"prompt": "...", "completion": "..."}}     loss on the completion only
Each example ends with the EOS token. A file with bad lines is refused, naming every one.

output (--out DIR): adapter/ (load with from_pretrained(..., adapter=DIR/adapter)),
  loss.csv, loss.png and state.pt. Run the same command again to continue from the last
  save, or with a larger --steps to train longer. Ctrl-C saves and stops.

--mode combines methods with commas, e.g. embeddings,bottleneck (the lectures' Emb+Adpt) or
ptune,lora; the default --lr of a combination is the smallest of its modes'.
default --lr by mode: {", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())}

example:
  swarm finetune --initial-peers $(head -1 dht.txt) --data chat.jsonl --out runs/chat \\
      --mode lora --lora-rank 8 --steps 200 --batch-size 8 --save-every 50
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm finetune",
        description="Fine-tune your own small parameters (soft prompts, deep prompts, LoRA, IA3, prefixes,\n"
                    "bottleneck adapters, or the client's embeddings and head) of a model whose blocks\n"
                    "are served by peers. The peers' weights never change.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--initial-peers", action="append", required=True, metavar="MULTIADDR",
                        help="a DHT multiaddr, as printed by `swarm dht` (repeatable or comma-separated)")
    add_join_argument(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, HF folder or .gguf (default {DEFAULT_MODEL})")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="training examples (see below)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the adapter, loss curve and state go")
    parser.add_argument("--mode", type=parse_modes, default="lora", metavar="MODE[,MODE...]",
                        help="what trains: ptune (soft prompts), deep_ptune (plus per-block prompts), embeddings "
                             "(the token embeddings), lora, ia3 (scaling vectors), prefix (key/value prefixes), "
                             "bottleneck (adapters), or none (the client's embeddings, norm and LM head); "
                             "comma-separated to combine (default lora)")
    parser.add_argument("--pre-seq-len", type=int, default=16, metavar="N", help="soft prompt length for ptune/deep_ptune (default 16)")
    parser.add_argument("--lora-rank", type=int, default=8, metavar="R", help="(default 8)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="scaling is alpha/rank (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="(default 0)")
    parser.add_argument("--lora-targets", default=None, metavar="NAMES",
                        help="comma-separated linear layers of each block, e.g. q_proj,k_proj,v_proj,o_proj "
                             "(default: the model family's, e.g. self_attn.q_proj,self_attn.v_proj for Llama)")
    parser.add_argument("--prefix-tokens", type=int, default=16, metavar="N", help="virtual tokens of --mode prefix (default 16)")
    parser.add_argument("--prefix-projection", type=int, default=0, metavar="H",
                        help="train the prefix through an MLP with H hidden units, as PEFT's prefix_projection "
                             "(default 0: train the keys/values directly)")
    parser.add_argument("--bottleneck-placement", choices=("pfeiffer", "houlsby"), default="pfeiffer",
                        help="adapters after the feed-forward (pfeiffer) or after attention and feed-forward "
                             "(houlsby) (default pfeiffer)")
    parser.add_argument("--bottleneck-reduction", type=int, default=16, metavar="R",
                        help="bottleneck size is hidden size / R (default 16)")
    parser.add_argument("--steps", type=int, default=100, help="total optimizer steps of the run, resumed ones included (default 100)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default depends on --mode, see below)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    parser.add_argument("--max-length", type=int, default=256, metavar="TOKENS", help="truncate each example to this many tokens (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and dropout (default 0)")
    parser.add_argument("--save-every", type=int, default=25, metavar="N", help="save every N steps, and at the end (default 25)")
    add_verify(parser)
    return parser


def parse_modes(text: str) -> str:
    """'embeddings, bottleneck' -> 'embeddings,bottleneck'; unknown or repeated modes are refused."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(unknown) or repr(text)}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"{text!r} names a mode twice")
    if "none" in modes and len(modes) > 1:
        raise argparse.ArgumentTypeError("none trains the client's own parts and combines with nothing")
    return ",".join(modes)


def default_lr(mode: str) -> float:
    return min(DEFAULT_LR[m] for m in mode.split(","))


def tuning_modes(args: argparse.Namespace) -> list | None:
    """--mode and its flags as from_pretrained's tuning_mode."""
    from swarm.tuning import BottleneckAdapter, PrefixTuning

    if args.mode == "none":
        return None
    methods = {"prefix": lambda: PrefixTuning(args.prefix_tokens, projection=args.prefix_projection or None),
               "bottleneck": lambda: BottleneckAdapter(args.bottleneck_placement, args.bottleneck_reduction)}
    return [methods[m]() if m in methods else m for m in args.mode.split(",")]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--max-length", args.max_length, 2), ("--save-every", args.save_every, 1),
                               ("--pre-seq-len", args.pre_seq_len, 1), ("--lora-rank", args.lora_rank, 1),
                               ("--prefix-tokens", args.prefix_tokens, 1), ("--prefix-projection", args.prefix_projection, 0),
                               ("--bottleneck-reduction", args.bottleneck_reduction, 1)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_targets is not None and not [t for t in args.lora_targets.split(",") if t.strip()]:
        parser.error("--lora-targets names no layer")


def run_setup(args: argparse.Namespace, family) -> dict:
    """The settings that fix what the trainable parameters are; a resumed run must match them.
    `family` (the model's ModelFamily; only --mode lora needs it) gives LoRA's default targets."""
    modes = args.mode.split(",")
    setup = {"model": args.model, "mode": args.mode}
    if "ptune" in modes or "deep_ptune" in modes:
        setup["pre_seq_len"] = args.pre_seq_len
    if "lora" in modes:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else list(family.default_lora_targets)
        setup.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets)
    if "prefix" in modes:
        setup.update(prefix_tokens=args.prefix_tokens, prefix_projection=args.prefix_projection)
    if "bottleneck" in modes:
        setup.update(bottleneck_placement=args.bottleneck_placement, bottleneck_reduction=args.bottleneck_reduction)
    return setup


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    peers = initial_peers_argument(parser, args.initial_peers)
    join = join_argument(parser, args.join)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from . import run_state as ckpt
    from .data import DataError, file_digest, read_jsonl
    from .trainer import train

    out = Path(args.out)
    try:
        records = read_jsonl(args.data)  # bad data fails here, before the swarm is joined
    except DataError as e:
        print(f"swarm finetune: error: {e}", file=sys.stderr)
        return 2
    from swarm.checkpoint import resolve_checkpoint
    from swarm.models import get_family

    setup = run_setup(args, get_family(resolve_checkpoint(args.model).config))
    state = ckpt.load_state(out) if out.exists() else None
    if state is not None:
        mismatch = ckpt.setup_mismatch(state.setup, setup)
        if mismatch:
            print(f"swarm finetune: error: {out} holds a run with other settings ({mismatch}); "
                  "use the same settings to resume, or a fresh --out", file=sys.stderr)
            return 2
        if state.step >= args.steps:
            print(f"{out} already finished: step {state.step} of --steps {args.steps}; nothing to do "
                  "(raise --steps to train longer)")
            return 0
    out.mkdir(parents=True, exist_ok=True)

    from client import AutoDistributedModelForCausalLM, SwarmSettings  # only now: transformers takes seconds to import

    torch.manual_seed(args.seed)  # the initial soft prompts / LoRA A draw from it
    with exit_if_not_joined(parser.prog):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=peers, tuning_mode=tuning_modes(args), pre_seq_len=args.pre_seq_len,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_targets=setup.get("lora_targets"), join=join, settings=SwarmSettings(verify=args.verify))
    try:
        if model.tokenizer is None:
            print(f"swarm finetune: error: {args.model} has no tokenizer to read the data with", file=sys.stderr)
            return 2
        return train(model, args, out, records, state, setup, file_digest(args.data),
                     args.lr or default_lr(args.mode))
    except DataError as e:
        print(f"swarm finetune: error: {e}", file=sys.stderr)
        return 2
    finally:
        model.swarm.shutdown()
