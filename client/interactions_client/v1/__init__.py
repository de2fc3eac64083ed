"""Generated from protos/interactions/v1 by scripts/generate_protos.py; do not edit."""
