"""How peers behind NAT are reached (see DESIGN.md, "Reach").

A peer finds out whether others can dial its gRPC port by asking DHT nodes to dial it back
(probe.py), not by guessing from its addresses. When nobody can, it starts a libp2p daemon of
its own that holds reservations on relays (`swarm dht --relay`) and takes gRPC over libp2p
streams (relayed.py); its record then lists the circuit multiaddrs. Dialers (clients) turn
such a record into a local TCP endpoint (tunnels.py) whose connections go over a hole-punched
TCP connection when one can be made (punch.py), else over a stream through a relay; above
the transport everything stays plain gRPC, and routing measures a relayed hop's round trip
through its tunnel like any other.
"""
