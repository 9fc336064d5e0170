"""Record when each pipeline action ran, and turn the records into a Chrome trace, a PNG and a bubble figure.

Measured bubbles are how we check the cost model's pipeline term (``theoretical_bubble``) on real runs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from megahet.errors import MegahetError
from megahet.parallel.schedules import Action

__all__ = ["TraceEvent", "ScheduleTracer", "to_chrome_trace", "write_chrome_trace", "bubble_fraction",
           "write_timeline_png", "theoretical_bubble"]

_COMPUTE = ("fwd", "bwd")
_COLORS = {"fwd": "#4c72b0", "bwd": "#dd8452", "comm": "#b0b0b0"}


@dataclass(frozen=True)
class TraceEvent:
    """One timed action: ``category`` is "fwd", "bwd" or "comm"; times in seconds from a common start."""

    name: str
    category: str
    start: float
    end: float


def _category(action: Action) -> str:
    return action.op if action.op in _COMPUTE else "comm"


class ScheduleTracer:
    """Collects ``TraceEvent`` s for one pp rank; pass it as ``tracer=`` to ``execute_schedule``.

    Give every rank the same ``start`` (a ``time.perf_counter()`` value) to share a time origin: that is
    exact for threads of one process and for processes on one host (perf_counter is monotonic system
    time on Linux); across hosts align the traces afterwards.
    """

    def __init__(self, rank: int, start: float | None = None) -> None:
        self.rank = rank
        self.start = time.perf_counter() if start is None else start
        self.events: list[TraceEvent] = []
        self._open: dict[Action, float] = {}

    def begin(self, action: Action) -> None:
        self._open[action] = time.perf_counter() - self.start

    def end(self, action: Action) -> None:
        begin = self._open.pop(action)
        self.events.append(TraceEvent(str(action), _category(action), begin, time.perf_counter() - self.start))


def to_chrome_trace(events_per_rank: list[list[TraceEvent]], labels: list[str] | None = None) -> dict:
    """Chrome trace-event JSON (chrome://tracing, Perfetto): one pid/tid per row, times in µs."""
    trace = []
    for rank, events in enumerate(events_per_rank):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank,
                      "args": {"name": labels[rank] if labels else f"pp rank {rank}"}})
        for e in events:
            trace.append({"name": e.name, "cat": e.category, "ph": "X", "pid": rank, "tid": rank,
                          "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | Path, events_per_rank: list[list[TraceEvent]],
                       labels: list[str] | None = None) -> None:
    """Write ``to_chrome_trace`` as JSON to ``path``."""
    Path(path).write_text(json.dumps(to_chrome_trace(events_per_rank, labels)))


def bubble_fraction(events_per_rank: list[list[TraceEvent]]) -> float:
    """Idle share of compute time, averaged over ranks.

    The span runs from the first fwd/bwd start to the last fwd/bwd end over all ranks; each rank's
    bubble is ``1 - busy / span`` where busy is its total fwd+bwd time (comm counts as idle).
    """
    compute = [[e for e in events if e.category in _COMPUTE] for events in events_per_rank]
    everything = [e for events in compute for e in events]
    if not everything:
        raise MegahetError("no fwd/bwd events to measure a pipeline bubble from; trace a training step first")
    span = max(e.end for e in everything) - min(e.start for e in everything)
    if span <= 0:
        return 0.0
    return sum(1.0 - sum(e.end - e.start for e in events) / span for events in compute) / len(compute)


def theoretical_bubble(pp: int, m: int, chunks: int = 1) -> float:
    """Ideal bubble of (interleaved) 1F1B as a share of step time: ``(pp - 1) / (chunks * m + pp - 1)``.

    With equal per-chunk times and free communication, each rank computes for ``chunks * m`` chunk-slots
    (forward plus backward) and waits ``pp - 1`` slots filling and draining the pipeline.
    """
    if pp < 1 or m < 1 or chunks < 1:
        raise MegahetError(f"theoretical_bubble needs positive sizes, got pp={pp} m={m} chunks={chunks}")
    return (pp - 1) / (chunks * m + pp - 1)


def write_timeline_png(path: str | Path, events_per_rank: list[list[TraceEvent]], labels: list[str] | None = None,
                       groups: list[str] | None = None) -> None:
    """Draw one row per rank to a PNG at ``path``: fwd blue, bwd orange, comm grey; or, with ``groups``
    (the device group of each row), compute colored by group (fwd solid, bwd hatched) and comm grey."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MegahetError("write_timeline_png needs matplotlib; pip install matplotlib") from exc
    # A bare Figure with the Agg canvas: no pyplot, so no global backend switch for the caller.
    fig = Figure(figsize=(12, 0.6 * len(events_per_rank) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    palette = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    group_color = {g: palette[i % len(palette)] for i, g in enumerate(dict.fromkeys(groups or []))}
    for rank, events in enumerate(events_per_rank):
        for e in events:
            hatch = None
            if groups and e.category in _COMPUTE:
                color, hatch = group_color[groups[rank]], ("//" if e.category == "bwd" else None)
            else:
                color = _COLORS.get(e.category, _COLORS["comm"])
            ax.broken_barh([(e.start, e.end - e.start)], (rank - 0.4, 0.8), facecolors=color, hatch=hatch,
                           edgecolor="white" if hatch else None)
            if e.category in _COMPUTE:
                ax.text((e.start + e.end) / 2, rank, e.name, ha="center", va="center", fontsize=6, clip_on=True)
    if groups:
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=c, label=g) for g, c in group_color.items()] +
                  [Patch(color=_COLORS["comm"], label="communication / waiting")], loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.set_yticks(range(len(events_per_rank)), labels or [f"rank {r}" for r in range(len(events_per_rank))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("pipeline schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
