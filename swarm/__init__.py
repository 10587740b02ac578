"""swarmlm's shared core: checkpoints, model families, block spans, wire format, DHT records.

Used by both the peer and the client; knows nothing of servers or clients.
"""

__version__ = "0.1.0"
