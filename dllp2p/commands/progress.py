"""The set-up's progress events (session.progress) for a person at a terminal: a rich progress bar per
worker receiving weights (bytes, MB/s), a line when an engine build starts and ends, notes as
`dllp2p: ...` lines."""

from __future__ import annotations

from typing import Any, TextIO

from ..session.progress import BUILD, Event, Note


class RichEvents:
    """A sink for session.progress events, drawing on `err`; use it as a context manager (the bars stop
    at the end)."""

    def __init__(self, err: TextIO):
        self.err = err
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Note):
            self._print(f"dllp2p: {event.text}")
        elif event.task == BUILD:
            if event.subject == "root":
                self._print("dllp2p: building the engine (JIT compile, weight packing)" if not event.finished
                            else "dllp2p: engine built")
        else:
            task = self._tasks.get(event.subject)
            if task is None:
                task = self._tasks[event.subject] = self._bars().add_task(f"weights → {event.subject}",
                                                                          total=event.total)
            self._bars().update(task, completed=event.done)

    def _bars(self) -> Any:
        if self._progress is None:
            from rich.console import Console  # rich: only when there is something to draw
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      console=Console(file=self.err), transient=False)
            self._progress.start()
        return self._progress

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.err)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> RichEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
