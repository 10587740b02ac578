"""Generated from protos/swarm.proto by scripts/gen_protos.py; do not edit."""
