"""The user's side of swarmlm: a transformers-shaped model whose blocks run on peers."""

from .model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM, RemoteCache
from .remote_swarm import RemoteSwarm, SwarmSettings
from .routing import MissingBlocksError
from .session import InferenceSession, SessionError

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
