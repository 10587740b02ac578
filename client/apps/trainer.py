"""The training loop of `swarm finetune`: batches -> forward/backward through the peers ->
AdamW, saving the run's state (client/apps/run_state.py) every --save-every steps and at the
end; Ctrl-C finishes the current step, saves and exits."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

EXIT_INTERRUPTED = 130  # what shells report for a Ctrl-C'd command


class GracefulStop:
    """Ctrl-C once: finish the step, save, exit. Twice: abandon the step now (only while it waits
    on the network; never halfway through an optimizer update), still saving the last whole step."""

    def __init__(self):
        self.requested = False
        self._interruptible = False
        self._previous = None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested and self._interruptible:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            print("\nstopping after this step to save it (Ctrl-C again to abandon the step)", file=sys.stderr, flush=True)

    @contextmanager
    def interruptible(self):
        self._interruptible = True
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self._interruptible = False


def train(model, args: argparse.Namespace, out: Path, records, state, setup: dict, digest: str, lr: float) -> int:
    """Runs steps until --steps (resuming `state` if given); the exit code."""
    import torch
    from tqdm import tqdm

    from . import run_state as ckpt
    from .data import BatchStream, pad_id_of, tokenize

    examples = tokenize(records, model.tokenizer, args.max_length, path=args.data)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    position = 0
    if state is not None:
        if state.trainable.keys() != params.keys():
            raise RuntimeError(f"{out / ckpt.STATE_FILE} holds parameters {sorted(state.trainable)[:3]}..., "
                               f"this model trains {sorted(params)[:3]}...; use a fresh --out")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state.trainable[name])
        optimizer.load_state_dict(state.optimizer)
        for group in optimizer.param_groups:  # a new --lr applies from here on
            group["lr"] = lr
        torch.set_rng_state(state.rng)
        losses, position = list(state.losses), state.data_position
        if state.data_digest != digest:
            print(f"note: {args.data} changed since the last save; continuing on the new data", file=sys.stderr)
        print(f"resuming from step {state.step}", flush=True)
    stream = BatchStream(examples, args.batch_size, pad_id_of(model.tokenizer), seed=args.seed, position=position)
    done = len(losses)
    saved = done

    def save() -> None:
        nonlocal saved
        if hasattr(model, "save_adapter"):
            ckpt.replace_dir(out / ckpt.ADAPTER_DIR, model.save_adapter)
        ckpt.write_loss_csv(out, losses)
        if losses:
            ckpt.write_loss_plot(out, losses, f"{args.model} · {args.mode}")
        # state.pt last: it is what a resumed run trusts, so it only ever names a save that is whole.
        ckpt.save_state(out, ckpt.TrainingState(
            setup=setup, step=done, trainable={n: p.detach().clone() for n, p in params.items()},
            optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), data_position=stream.position,
            data_digest=digest, losses=list(losses)))
        saved = done

    trainable = sum(p.numel() for p in params.values())
    print(f"training {trainable:,} parameters ({args.mode}) on {len(examples)} examples "
          f"for steps {done + 1}..{args.steps}", flush=True)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=args.steps, initial=done, desc="finetune", unit="step", dynamic_ncols=True)
    with GracefulStop() as stop:
        while done < args.steps:
            position_before, rng_before = stream.position, torch.get_rng_state()
            try:
                with stop.interruptible():
                    batch = stream.next_batch()
                    loss = model(**batch).loss
                    loss.backward()
            except BaseException as e:
                # Nothing of this step reached the parameters: roll its data and RNG back, keep what is whole.
                stream.position = position_before
                torch.set_rng_state(rng_before)
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                if done > saved:
                    save()
                if isinstance(e, KeyboardInterrupt):
                    print(f"interrupted: saved at step {saved}; run the same command to continue", flush=True)
                    return EXIT_INTERRUPTED
                print(f"step {done + 1} failed; saved at step {saved}; run the same command to continue",
                      file=sys.stderr, flush=True)
                raise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            losses.append(float(loss.detach()))
            recent = losses[-10:]
            bar.set_postfix(loss=f"{losses[-1]:.4f}", avg10=f"{sum(recent) / len(recent):.4f}")
            bar.update(1)
            if done % args.save_every == 0 or done == args.steps or stop.requested:
                save()
            if stop.requested and done < args.steps:
                bar.close()
                print(f"interrupted: saved at step {done}; run the same command to continue", flush=True)
                return EXIT_INTERRUPTED
    bar.close()
    elapsed = time.perf_counter() - started
    where = f"{out / ckpt.ADAPTER_DIR}" if hasattr(model, "save_adapter") else f"{out / ckpt.STATE_FILE} (no save_adapter)"
    print(f"done: step {done}, loss {losses[-1]:.4f}, {elapsed:.1f} s this run; saved {where}, "
          f"{out / ckpt.LOSS_CSV}, {out / ckpt.LOSS_PNG}", flush=True)
    return 0
