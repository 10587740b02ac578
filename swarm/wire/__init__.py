"""The wire layer: tensors <-> protobuf messages, compression codecs, and the generated gRPC code.

Everything above this layer (peer service, client sessions) imports from here, never from
`swarm.wire.proto` or the codec classes directly.
"""

from .codecs import CODECS, Codec, get_codec
from .proto import swarm_pb2, swarm_pb2_grpc
from .tensors import DTYPES, WireError, deserialize_tensor, optional_tensor, serialize_tensor

__all__ = [
    "CODECS",
    "DTYPES",
    "Codec",
    "WireError",
    "deserialize_tensor",
    "get_codec",
    "optional_tensor",
    "serialize_tensor",
    "swarm_pb2",
    "swarm_pb2_grpc",
]
