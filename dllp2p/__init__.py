"""dllp2p: tensor-parallel LLM inference across the cheap computers on a home LAN."""

__version__ = "0.1.0"
