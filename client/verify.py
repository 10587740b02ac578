"""Verification: part of every peer's work redone on an independent replica, so that a peer
returning wrong activations (a bug, a broken GPU, malice) is caught and routed around.

`SwarmSettings(verify=FRACTION)` checks:
- the first call of each kind (Forward, Backward, inference) to each peer: a peer is on
  probation until one of its answers matched a replica's, so a peer that lies on every call
  is caught before any of its outputs is used;
- then each call with probability FRACTION.

A check runs the same work on a chain of other peers for the same blocks (of the same
quantization: peers are compared against their own kind) and compares the outputs token by
token (`distance`) against a tolerance set by the coarser compute dtype of the two and the
wire codec (`tolerance`). Why replicas and not activation hashes (TOPLOC): TOPLOC commits to
hashes so that a validator can check later without the prover; here the client holds every
output anyway, and the validator's work is the same prefill-shaped forward pass either way.

An inference step can only be recomputed with the session's cache, so the checker of a hop
is a second session on the replica (`Mirror`, client/session.py) that gets the hop's steps
late and in bulk, when a check is due: one check covers every step since the last one.

Two chains that disagree do not say which one lies. A third (the referee) decides: the peer
that disagrees with both others is banned for this client for good and flagged in the DHT
(swarm/flags.py), and its work is redone elsewhere. With no referee, or no majority, both
sides are left out for a while and the work is redone elsewhere. With verify=0 (the
default) none of this exists: no Verifier is made, the hot path has one `is None` test.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from typing import Callable, Sequence

import torch

from .routing import Hop, MissingBlocksError
from .transport import PeerCallError


logger = logging.getLogger(__name__)

# Largest per-token relative distance two honest replicas reach, by the coarser compute dtype,
# with a margin: measured on the default model's 10-block spans, bfloat16 against float32 at
# most 0.022 (median 0.009); float32 replicas differ by float rounding (batched or not) < 1e-5.
DTYPE_TOLERANCE = {"float32": 1e-3, "float16": 0.02, "bfloat16": 0.08}
# What a lossy wire codec adds (each side's answer is encoded once).
CODEC_TOLERANCE = {"raw": 0.0, "float16": 2e-3, "bfloat16": 0.01, "int8": 0.05, "int8_blockwise": 0.05}
# Both sides of a disagreement nobody could settle are left out this long.
SUSPECT_BAN_SECONDS = 300.0
# A span with no second peer is looked for again after this long (not on every step).
_NO_REPLICA_SECONDS = 10.0


class Verdict(enum.Enum):
    agreed = "agreed"
    primary_lied = "primary lied"  # the checked peer was outvoted: convicted
    checker_lied = "checker lied"  # the replica was outvoted: convicted, the answer stands
    unresolved = "unresolved"  # a disagreement without a majority: both left out for a while
    unchecked = "unchecked"  # no replica to check with (or it failed)


class WrongOutputs(PeerCallError):
    """A peer's answer disagreed with its replicas: redo its work on other peers."""


def distance(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest relative L2 distance between matching rows (the last dimension: a token's
    hidden state), each row's norm floored at 1e-3 of the largest (rows near zero would
    otherwise turn rounding into distance). inf if the shapes differ."""
    if ours.shape != theirs.shape:
        return math.inf
    a, b = ours.detach().float().reshape(-1, ours.shape[-1] if ours.ndim else 1), theirs.detach().float()
    b = b.reshape(a.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return 0.0 if torch.equal(a, b) else math.inf
    norms = torch.maximum(a.norm(dim=-1), b.norm(dim=-1))
    floor = max(float(norms.max()) * 1e-3, 1e-12) if norms.numel() else 1e-12
    return float(((a - b).norm(dim=-1) / norms.clamp_min(floor)).max()) if norms.numel() else 0.0


class Verifier:
    """Decides which calls to check, checks them, and acts on the verdict (see the module doc).
    `swarm` is the client's RemoteSwarm (its records, routes, bans and flags)."""

    def __init__(self, swarm, fraction: float, rng: random.Random | None = None):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"verify must be a fraction in (0, 1], got {fraction}")
        self.swarm, self.fraction = swarm, fraction
        self.rng = rng or random.Random()
        self._vouched: set[tuple[str, str]] = set()  # (peer id, kind) that passed a check
        self._no_replica: dict[tuple[int, int, str], float] = {}  # span and kind -> when we last found none
        self.checks = self.mismatches = 0
        self.largest_agreed = 0.0  # the largest distance of a check that passed: how close honest peers come
        self.convicted: set[str] = set()

    def due(self, peer_id: str, kind: str) -> bool:
        """Whether this call of `kind` ("forward", "backward", "inference") to the peer is checked."""
        return (peer_id, kind) not in self._vouched or self.rng.random() < self.fraction

    def replica(self, hop: Hop, exclude: frozenset[str] = frozenset()) -> list[Hop] | None:
        """A chain for the hop's blocks without the hop's peer (and `exclude`), of its kind; None if
        the swarm has none now (then the hop's work goes unchecked, logged once a while)."""
        key = (hop.start, hop.end, hop.peer.quant)
        if not exclude and time.monotonic() - self._no_replica.get(key, -math.inf) < _NO_REPLICA_SECONDS:
            return None
        try:
            return self.swarm.routes.find_chain(self.swarm.records(), hop.start, hop.end,
                                                exclude=exclude | {hop.peer.peer_id}, quant=hop.peer.quant)
        except MissingBlocksError:
            if not exclude:
                if key not in self._no_replica:
                    logger.warning("blocks [%d, %d) have no second peer (quant %s) to check %s against: "
                                   "its work is not verified", hop.start, hop.end, hop.peer.quant, hop.endpoint)
                self._no_replica[key] = time.monotonic()
            return None

    def tolerance(self, hop: Hop, chain: Sequence[Hop]) -> float:
        worst = max(DTYPE_TOLERANCE.get(p.dtype, 0.1) for p in [hop.peer, *(h.peer for h in chain)])
        return worst + CODEC_TOLERANCE.get(self.swarm.settings.codec, 0.05)

    def judge(self, kind: str, hop: Hop, ours: Sequence[torch.Tensor],
              recompute: Callable[[list[Hop]], Sequence[torch.Tensor]],
              checker: list[Hop] | None = None) -> Verdict:
        """Checks `ours` (the hop's answer) against `recompute(chain)` on a replica (`checker`,
        or one found now) and, on a disagreement, a referee; acts on the verdict."""
        checker = checker or self.replica(hop)
        if checker is None:
            return Verdict.unchecked
        self.checks += 1
        theirs = self._run(recompute, checker)
        if theirs is None:
            return Verdict.unchecked
        tol = self.tolerance(hop, checker)
        apart = _apart(ours, theirs)
        if apart <= tol:
            self.largest_agreed = max(self.largest_agreed, apart)
            self._vouched.add((hop.peer.peer_id, kind))
            return Verdict.agreed
        self.mismatches += 1
        checkers = frozenset(h.peer.peer_id for h in checker)
        referee = self.replica(hop, exclude=checkers)
        third = self._run(recompute, referee) if referee is not None else None
        if third is not None:
            tol = max(tol, self.tolerance(hop, referee))
            with_ours, with_theirs = _apart(third, ours) <= tol, _apart(third, theirs) <= tol
            if with_theirs and not with_ours:
                self._convict([hop], kind, apart, tol)
                return Verdict.primary_lied
            if with_ours and not with_theirs:
                self._convict(checker, kind, _apart(third, theirs), tol)
                return Verdict.checker_lied
        logger.warning("%s of blocks [%d, %d) on %s and on %s disagree (distance %.3g > %.3g) and no third peer "
                       "settles it: leaving both out for %.0f s", kind, hop.start, hop.end, hop.endpoint,
                       ", ".join(h.endpoint for h in checker), apart, tol, SUSPECT_BAN_SECONDS)
        for peer_id in checkers | {hop.peer.peer_id}:
            self.swarm.routes.ban(peer_id, SUSPECT_BAN_SECONDS)
        return Verdict.unresolved

    def _run(self, recompute, chain: list[Hop]) -> Sequence[torch.Tensor] | None:
        try:
            return recompute(chain)
        except PeerCallError as e:  # the checker failed, which says nothing of the checked peer
            logger.info("could not check on %s: %s", ", ".join(h.endpoint for h in chain), e)
            self.swarm.ban_endpoint(e.endpoint)
            return None

    def _convict(self, chain: Sequence[Hop], kind: str, apart: float, tol: float) -> None:
        """Bans the peers of `chain` for good; flags them in the DHT when the chain is one peer
        (of several, we cannot tell which one lied)."""
        for hop in chain:
            self.swarm.routes.ban(hop.peer.peer_id, math.inf)
            self.convicted.add(hop.peer.peer_id)
        reason = f"{kind} outputs of blocks [{chain[0].start}, {chain[-1].end}) differ from two replicas' " \
                 f"(distance {apart:.3g} > tolerance {tol:.3g})"
        logger.warning("peer %s: %s; banned for this client%s", ", ".join(h.endpoint for h in chain), reason,
                       " and flagged in the DHT" if len(chain) == 1 else "")
        if len(chain) == 1:
            self.swarm.flag(chain[0].peer.peer_id, reason)


def redo_if_lied(verdict: Verdict, hop: Hop) -> None:
    """Raises WrongOutputs (the caller redoes the hop's work elsewhere) unless its answer stands."""
    if verdict in (Verdict.primary_lied, Verdict.unresolved):
        raise WrongOutputs(hop.endpoint, f"blocks [{hop.start}, {hop.end}) returned outputs that its replicas "
                                         "disagree with")


def _apart(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> float:
    if len(ours) != len(theirs):
        return math.inf
    return max((distance(a, b) for a, b in zip(ours, theirs)), default=0.0)
