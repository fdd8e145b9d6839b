"""Progress of a session's slow set-up, as events rather than text: the root pushing weights to each
worker, every node building its engine (JIT compile and weight packing), and notes for a person (a worker
left out of the plan, planning without one that does not answer).

The session code hands each event to a sink (any callable); what to do with it is the caller's: the CLI
draws rich progress bars (commands/progress.py), the daemon logs lines (LogEvents), the root service keeps
the latest per subject for Status. Events are sent from the trio thread that runs the set-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Union

PUSH, BUILD = "push", "build"  # Progress.task


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units of `task` for `subject`: bytes pushed to a worker ("push"); 0 or 1 of 1
    engine built ("build": started, finished)."""

    task: str
    subject: str  # a worker's "worker HOST:PORT (node ID)", or "root"
    done: int
    total: int

    def __post_init__(self) -> None:
        if self.task not in (PUSH, BUILD) or not 0 <= self.done <= self.total:
            raise ValueError(f"progress {self.task!r} {self.done} of {self.total}")

    @property
    def finished(self) -> bool:
        return self.done == self.total


@dataclass(frozen=True)
class Note:
    """One line for a person."""

    text: str


Event = Union[Progress, Note]
Sink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink that drops every event."""


class LogEvents:
    """A sink that logs: each Note, each build's start and end, each push's start and end."""

    def __init__(self, log: logging.Logger):
        self.log = log

    def __call__(self, event: Event) -> None:
        if isinstance(event, Note):
            self.log.info("%s", event.text)
        elif event.task == BUILD:
            self.log.info("%s: %s the engine (JIT compile, weight packing)", event.subject,
                          "built" if event.finished else "building")
        elif event.done == 0 or event.finished:
            self.log.info("%s: weights pushed %.1f of %.1f MB", event.subject, event.done / 1e6, event.total / 1e6)


class Latest:
    """A sink that keeps the latest Progress per (task, subject), for Status; passes every event on."""

    def __init__(self, then: Sink = ignore):
        self.then = then
        self.progress: dict[tuple[str, str], Progress] = {}

    def clear(self) -> None:
        self.progress = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.progress[(event.task, event.subject)] = event
        self.then(event)
