"""`swarm generate`: text from the swarm, streamed to stdout as it is generated."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from swarm.initial_peers import exit_if_not_joined, initial_peers_argument
from swarm.membership.join_flag import add_join_argument, join_argument
from swarm.named_models import DEFAULT_MODEL  # no torch: --help and argument errors stay instant

from .swarm_options import add_verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm generate",
        description="Generate text with a model whose blocks are served by peers of the swarm. "
                    "Tokens stream to stdout; speed goes to stderr.",
        epilog='example: swarm generate --initial-peers /ip4/127.0.0.1/tcp/4321/p2p/Qm... --chat "What is a swarm?"',
    )
    parser.add_argument("prompt", nargs="?", help="the text to continue (or, with --chat, your message); "
                        "--chat without a prompt starts an interactive chat")
    parser.add_argument("--initial-peers", action="append", required=True, metavar="MULTIADDR",
                        help="a DHT multiaddr, as printed by `swarm dht` (repeatable)")
    add_join_argument(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, HF folder or .gguf (default {DEFAULT_MODEL})")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    parser.add_argument("--codec", default="raw", choices=["raw", "float16", "bfloat16", "int8", "int8_blockwise"],
                        help="how activations travel between client and peers: raw is exact; float16 halves the "
                        "bytes; int8 (one byte a value, a token's few huge features sent exactly) quarters them")
    parser.add_argument("--full-precision", action="store_true",
                        help="use only peers that serve unquantized weights, never those started with "
                        "`swarm peer --quant`; fails naming the blocks only quantized peers serve")
    add_verify(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    peers = initial_peers_argument(parser, args.initial_peers)
    join = join_argument(parser, args.join)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import TextStreamer

    from client import AutoDistributedModelForCausalLM, SwarmSettings

    settings = SwarmSettings(codec=args.codec, allow_quantized=not args.full_precision, verify=args.verify, join=join)
    with exit_if_not_joined(parser.prog):
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers, settings=settings)
    tokenizer = model.tokenizer
    if args.prompt is None:
        if not args.chat:
            print("swarm generate: give a prompt, or use --chat for an interactive chat", file=sys.stderr)
            return 2
        return interactive_chat(model, args)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = sampling_options(args)
    start = time.perf_counter()
    from client.routing import MissingBlocksError

    try:
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                streamer=TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True),
                                pad_token_id=tokenizer.pad_token_id, **sampling)
    except MissingBlocksError as e:  # nobody serves some blocks, or the swarm is private: one line
        print(f"swarm generate: error: {e}", file=sys.stderr)
        model.swarm.shutdown()
        return 1
    elapsed = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print(f"[{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    model.swarm.shutdown()
    return 0


def sampling_options(args) -> dict:
    if args.sample:
        return dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)
    return dict(do_sample=False, repetition_penalty=args.repetition_penalty)


CHAT_SESSION_TOKENS = 4096


def interactive_chat(model, args) -> int:
    """A multi-turn chat on one inference session: each turn sends only its new tokens.
    `/reset` starts over; Ctrl-D quits."""
    from transformers import TextStreamer

    tokenizer = model.tokenizer
    print("chat with the swarm: /reset starts over, Ctrl-D quits", file=sys.stderr)
    while True:
        session = model.inference_session(max_length=CHAT_SESSION_TOKENS)
        try:
            while True:
                try:
                    text = input("you> ").strip()
                except EOFError:
                    print(file=sys.stderr)
                    return 0
                if text == "/reset":
                    print("(conversation reset)", file=sys.stderr)
                    break
                if not text:
                    continue
                message = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)
                ids = tokenizer(message, return_tensors="pt")["input_ids"]
                print("assistant> ", end="", flush=True)
                start = time.perf_counter()
                output = model.generate(ids, session=session, max_new_tokens=args.max_new_tokens,
                                        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                                        **sampling_options(args))
                new = output.shape[1] - ids.shape[1]
                print(f"[{new / (time.perf_counter() - start):.1f} tokens/s, {session.position} tokens in session]",
                      file=sys.stderr)
        finally:
            session.close()
