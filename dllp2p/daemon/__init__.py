"""`dllp2p daemon` (layer 7 of 8, with api.py): the process every device runs. node.py listens and
dispatches, membership.py elects, probes.py answers Status, prompts.py holds the prompt slot; the work
itself is the session package's."""

from ..config import DEFAULT_PORT, Timeouts
from .node import Daemon, DaemonConfig, main

__all__ = ["DEFAULT_PORT", "Daemon", "DaemonConfig", "Timeouts", "main"]
