"""Decoding: one loop (``loop``) over pluggable backends (``reference``: HF modules; ``lean``: fused weights)."""
