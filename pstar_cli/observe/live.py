"""How a training run shows itself: a rich live view on a terminal, plain log lines elsewhere.

Every view takes the same step records (the dicts the trainer also writes to `metrics.jsonl`):
`on_step(record, logged)` is called after every optimizer step; `logged` marks the steps of
`train.log_interval`, whose loss is the mean over all ranks. Only rank 0 renders anything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pstar_cli.observe.metrics import format_bytes


class View(Protocol):
    live: bool  # True: wants every step's full record; False: only those of log steps

    def __enter__(self) -> "View": ...

    def __exit__(self, *exc_info) -> None: ...

    def on_step(self, record: dict[str, Any], logged: bool) -> None: ...

    def note(self, text: str) -> None:
        """A one-off line, e.g. "checkpoint written to ..."."""


@dataclass(frozen=True)
class RunInfo:
    """What a view says about the run as a whole."""

    title: str  # e.g. "gpt-mini · 1 rank · cpu"
    total_steps: int
    start_step: int = 0  # > 0 after a resume
    device_label: str = "device"  # "GPU" on CUDA; on CPU the engine's device side lives in host RAM


class NullView:
    """Shows nothing (e.g. `pstar profile`, which prints its own report)."""

    live = False

    def __enter__(self) -> "NullView":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def on_step(self, record: dict[str, Any], logged: bool) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class PlainLog:
    """One line per logged step, for logs and pipes (no terminal control codes)."""

    live = False

    def __init__(self, info: RunInfo, stream: IO[str] | None = None, path: Path | None = None) -> None:
        self.info = info
        self._path = path
        self._stream = stream
        self._owned: IO[str] | None = None

    def __enter__(self) -> "PlainLog":
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._owned = open(self._path, "a", encoding="utf-8")
        self._write(f"pstar train: {self.info.title}, {self.info.total_steps} steps")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def on_step(self, record: dict[str, Any], logged: bool) -> None:
        if logged:
            self._write(format_log_line(record, self.info))

    def note(self, text: str) -> None:
        self._write(text)

    def _write(self, line: str) -> None:
        stream = self._owned or self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


class LiveView:
    """The terminal dashboard, redrawn after every step."""

    live = True

    def __init__(self, info: RunInfo, console: Console | None = None) -> None:
        self.info = info
        self.console = console or Console()
        self.progress = build_progress(info)
        self._last: dict[str, Any] = {}
        self._live: Live | None = None

    def __enter__(self) -> "LiveView":
        self._live = Live(self.render(), console=self.console, refresh_per_second=4)
        self._live.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.__exit__(*exc_info)
            self._live = None

    def on_step(self, record: dict[str, Any], logged: bool) -> None:
        # keep the last known value of a field a step did not measure (e.g. loss between log steps)
        self._last.update({key: value for key, value in record.items() if value is not None})
        self.progress.update(self.progress.task_ids[0], completed=record["step"])
        if self._live is not None:
            self._live.update(self.render(), refresh=True)

    def note(self, text: str) -> None:
        self.console.print(text)

    def render(self) -> RenderableType:
        return render_dashboard(self._last, self.progress, self.info)


class TeeView:
    """Several views at once (rank 0 under torchrun on a terminal: live view + a log file)."""

    def __init__(self, *views: View) -> None:
        self.views = views
        self.live = any(view.live for view in views)

    def __enter__(self) -> "TeeView":
        for view in self.views:
            view.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        for view in reversed(self.views):
            view.__exit__(*exc_info)

    def on_step(self, record: dict[str, Any], logged: bool) -> None:
        for view in self.views:
            view.on_step(record, logged)

    def note(self, text: str) -> None:
        for view in self.views:
            view.note(text)


def build_progress(info: RunInfo) -> Progress:
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(bar_width=None),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        expand=True,
    )
    progress.add_task("train", total=info.total_steps, completed=info.start_step)
    return progress


def render_dashboard(record: dict[str, Any], progress: Progress, info: RunInfo) -> RenderableType:
    """The whole live view for the latest step record (an empty record before the first step)."""
    parts = (progress, metrics_grid(record), memory_grid(record), placement_panel(record, info))
    return Panel(Group(*parts), title=f"pstar train · {info.title}", title_align="left")


def metrics_grid(record: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 3))
    skipped = " [yellow](skipped: overflow)[/]" if record.get("skipped") else ""
    grid.add_row(
        f"step [bold]{record.get('step', 0)}[/]{skipped}",
        f"loss [bold cyan]{format_float(record.get('loss'), '.4f')}[/]",
        f"lr {format_float(record.get('lr'), '.3e')}",
        f"loss scale {format_float(record.get('loss_scale'), 'g')}",
    )
    grid.add_row(
        f"tokens/s [bold]{format_float(record.get('tokens_per_s'), ',.0f')}[/]",
        f"TFLOPS [bold]{format_float(record.get('tflops'), '.2f')}[/]",
        f"step {format_float(record.get('step_s'), '.3f')} s",
        "",
    )
    return grid


def memory_grid(record: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 3))
    if record.get("gpu_total_bytes"):
        gpu = f"GPU memory {format_bytes(record.get('gpu_mem_bytes'))} / {format_bytes(record['gpu_total_bytes'])}"
        if record.get("gpu_peak_allocated_bytes") is not None:
            gpu += f" (peak allocated {format_bytes(record['gpu_peak_allocated_bytes'])})"
    else:
        gpu = "GPU memory: no GPU"
    host = f"host memory {format_bytes(record.get('host_rss_bytes'))} RSS"
    if record.get("host_total_bytes"):
        host += f" / {format_bytes(record['host_total_bytes'])}"
    grid.add_row(gpu, host)
    return grid


def placement_panel(record: dict[str, Any], info: RunInfo) -> Panel:
    """Where the chunks are (counts and bytes, device vs host) and what moved during the last step."""
    table = Table(box=None, padding=(0, 2), show_edge=False)
    table.add_column("chunks", no_wrap=True)
    table.add_column(f"on {info.device_label}", justify="right", no_wrap=True)
    table.add_column("on host", justify="right", no_wrap=True)
    for kind, label in (("param", "params"), ("optim", "optimizer")):
        table.add_row(
            label,
            chunk_cell(record.get(f"{kind}_chunks_device"), record.get(f"{kind}_bytes_device")),
            chunk_cell(record.get(f"{kind}_chunks_host"), record.get(f"{kind}_bytes_host")),
        )
    table.add_row("[bold]moves", "[bold]last step", "[bold]run total")
    for direction in ("h2d", "d2h"):
        table.add_row(
            direction.upper(),
            chunk_cell(record.get(f"step_{direction}_moves"), record.get(f"step_{direction}_bytes")),
            chunk_cell(record.get(f"total_{direction}_moves"), record.get(f"total_{direction}_bytes")),
        )
    if record.get("total_gathers"):  # several ranks: param chunks all-gathered from the shards
        table.add_row("gathers", str(record.get("step_gathers")), str(record["total_gathers"]))
    budget = (
        f"budget: {info.device_label} {format_bytes(record.get('device_budget_bytes'))},"
        f" host {format_bytes(record.get('host_budget_bytes'))};"
        f" model data {format_bytes(record.get('model_data_bytes'))}"
    )
    return Panel(Group(table, budget), title="chunk placement", title_align="left")


def chunk_cell(num_chunks: int | None, num_bytes: int | None) -> str:
    if num_chunks is None:
        return "-"
    return f"{num_chunks} · {format_bytes(num_bytes)}"


def format_float(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_log_line(record: dict[str, Any], info: RunInfo) -> str:
    """`step 10/200 | loss 3.2145 | lr 3.00e-04 | ...`: one logged step as a plain line."""
    fields = [
        f"step {record['step']}/{info.total_steps}",
        f"loss {format_float(record.get('loss'), '.4f')}",
        f"lr {format_float(record.get('lr'), '.2e')}",
        f"scale {format_float(record.get('loss_scale'), 'g')}",
        f"{format_float(record.get('tokens_per_s'), ',.0f')} tok/s",
        f"{format_float(record.get('tflops'), '.2f')} TFLOPS",
        f"{format_float(record.get('step_s'), '.3f')} s/step",
    ]
    if record.get("gpu_total_bytes"):
        fields.append(f"gpu {format_bytes(record.get('gpu_mem_bytes'))}")
    fields.append(f"rss {format_bytes(record.get('host_rss_bytes'))}")
    if record.get("param_chunks_device") is not None:
        fields.append(
            f"chunks {info.device_label}/host {record['param_chunks_device']}/{record['param_chunks_host']}"
            f" h2d {record.get('step_h2d_moves')} d2h {record.get('step_d2h_moves')}"
        )
    if record.get("skipped"):
        fields.append("skipped (overflow)")
    return " | ".join(fields)


def choose_view(info: RunInfo, is_main: bool, is_tty: bool, log_path: Path | None = None) -> View:
    """Rank 0 on a terminal: the live view (plus plain lines in `log_path`, when given, so its log is
    kept too); rank 0 elsewhere and the other ranks (whose output torchrun writes to their log files):
    plain lines."""
    if is_main and is_tty:
        live = LiveView(info)
        return TeeView(live, PlainLog(info, path=log_path)) if log_path is not None else live
    return PlainLog(info)
