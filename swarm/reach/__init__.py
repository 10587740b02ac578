"""How peers behind NAT are reached (see DESIGN.md, "Reach").

A peer finds out whether others can dial its gRPC port by asking DHT nodes to dial it back
(probe.py), not by guessing from its addresses. When nobody can, it starts a libp2p daemon of
its own that holds reservations on relays (`swarm dht --relay`) and carries gRPC over libp2p
streams (relayed.py); its record then lists the circuit multiaddrs. Dialers (clients) turn
such a record into a local TCP endpoint whose connections are spliced onto those streams
(tunnels.py), so everything above the transport stays plain gRPC.
"""
