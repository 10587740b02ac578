"""swarm.flags: a flag counts only if its signature holds for what it says, and only while fresh."""

from __future__ import annotations

from types import SimpleNamespace

from hivemind.utils import get_dht_time

from swarm.flags import FLAG_LIFETIME, FlagSigner, count_flags

MODEL = "m-ab12cd34"


def entry(*values):
    return SimpleNamespace(value={str(i): SimpleNamespace(value=v, expiration_time=get_dht_time() + 60)
                                  for i, v in enumerate(values)})


def test_distinct_signers_are_counted_once_each():
    one, two = FlagSigner(), FlagSigner()
    values = [one.flag(MODEL, "liar", "wrong")[1], one.flag(MODEL, "liar", "again")[1],
              two.flag(MODEL, "liar", "wrong")[1], two.flag(MODEL, "other", "wrong")[1]]
    assert count_flags(MODEL, entry(*values)) == {"liar": 2, "other": 1}


def test_forged_tampered_stale_or_foreign_flags_do_not_count():
    signer = FlagSigner()
    _, genuine = signer.flag(MODEL, "liar", "wrong")
    renamed = {**genuine, "peer_id": "honest"}  # someone else's signature on another peer
    reworded = {**genuine, "reason": "something else"}
    _, old = signer.flag(MODEL, "liar", "wrong")
    old = {**old, "time": get_dht_time() - FLAG_LIFETIME - 1}  # (and no longer matches its signature)
    _, elsewhere = signer.flag("other-model-ab12cd34", "liar", "wrong")
    junk = [{"peer_id": "x"}, "not a dict", {**genuine, "signer": "bm90IGEga2V5"}]
    assert count_flags(MODEL, entry(renamed, reworded, old, elsewhere, *junk)) == {}
    assert count_flags(MODEL, entry(genuine)) == {"liar": 1}
    assert count_flags(MODEL, None) == {}
