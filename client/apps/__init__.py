"""The applications built on the client library: the `swarm generate`, `swarm status` and
`swarm finetune` commands, `make demo`, and a local swarm of processes for demos and
benchmarks. The library (client/*.py) never imports them."""
