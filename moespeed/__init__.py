"""moespeed: pre-train and run efficient sparse language models (MLA, DeepSeekMoE, PEER)."""

__version__ = "0.1.0"
