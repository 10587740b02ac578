"""The user's side of swarmlm: a transformers-shaped model whose blocks run on peers.

The names below load on first use: the commands in client/apps import this package, and
their `--help` and argument errors need not wait seconds for torch and transformers.
"""

__all__ = [
    "AutoDistributedModelForCausalLM",
    "DistributedModelForCausalLM",
    "InferenceSession",
    "MissingBlocksError",
    "RemoteCache",
    "RemoteSwarm",
    "SessionError",
    "SwarmSettings",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM, RemoteCache
    from .remote_swarm import RemoteSwarm, SwarmSettings
    from .routing import MissingBlocksError
    from .session import InferenceSession, SessionError

    loaded = dict(AutoDistributedModelForCausalLM=AutoDistributedModelForCausalLM,
                  DistributedModelForCausalLM=DistributedModelForCausalLM, InferenceSession=InferenceSession,
                  MissingBlocksError=MissingBlocksError, RemoteCache=RemoteCache, RemoteSwarm=RemoteSwarm,
                  SessionError=SessionError, SwarmSettings=SwarmSettings)
    globals().update(loaded)
    return loaded[name]
