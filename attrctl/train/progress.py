"""Progress bars for ``attrctl train``: one rich bar per job (with ETA), and one line per role
while a parallel iteration's processes run (read from the status files they write)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RichProgress:
    def __init__(self, console: Any = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    def _progress(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )

    def bar(self, job: str, total: int, unit: str):
        return _Bar(self._progress(), job, total, unit)

    def watch_roles(self, folder: Path, names: list[str], procs: list[Any]) -> None:
        """Render one line per role process until all have exited."""
        progress = self._progress()
        tasks = {n: progress.add_task(n, total=None, unit="", info="starting") for n in names}
        with progress:
            while any(p.poll() is None for p in procs):
                for n in names:
                    _refresh(progress, tasks[n], folder / f"{n}.status.json")
                time.sleep(0.5)
            for n in names:
                _refresh(progress, tasks[n], folder / f"{n}.status.json")


def _refresh(progress, task, path: Path) -> None:
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    info = " ".join(f"{k} {v}" for k, v in st.get("info", {}).items())
    progress.update(task, total=st["total"], completed=st["done"], unit=st["unit"], info=info,
                    description=st["job"])  # fmt: skip


class _Bar:
    def __init__(self, progress, job: str, total: int, unit: str):
        self.progress = progress
        self.progress.start()
        self.task = progress.add_task(job, total=total, unit=unit, info="")

    def update(self, n: int = 1, **info: Any) -> None:
        fields = {"info": " ".join(f"{k} {v}" for k, v in info.items())} if info else {}
        self.progress.update(self.task, advance=n, **fields)

    def close(self) -> None:
        self.progress.stop()
