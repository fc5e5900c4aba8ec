"""Per-layer LARS telemetry: ||w||, ||g|| and the trust ratio of every LARS parameter over steps.

``LARS(..., telemetry=True)`` creates a ``Telemetry`` and calls ``record`` once per param group per
step with the vectors the step computed anyway. Recording keeps them on their device (one small
``stack`` kernel, no host sync); ``history``, ``to_records`` and the exports copy everything to the
host at once, when asked. With ``telemetry=False`` (the default) the optimizer never calls it.

A record (one row of the CSV/JSON export) is
``{"step", "group", "param", "w_norm", "g_norm", "trust_ratio"}``; ``step`` counts
``optimizer.step()`` calls from the first recorded one (0-based), skipped steps included.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Telemetry", "LayerHistory", "FIELDS", "read_records", "write_records", "plot_trust_ratios"]

FIELDS = ("step", "group", "param", "w_norm", "g_norm", "trust_ratio")
_FLOAT_FIELDS = ("w_norm", "g_norm", "trust_ratio")


class LayerHistory(NamedTuple):
    """One parameter's telemetry over the steps it was recorded at (host float64 tensors)."""

    step: Tensor
    w_norm: Tensor
    g_norm: Tensor
    trust_ratio: Tensor


@dataclass(frozen=True)
class _Entry:
    step: int
    group: int
    names: tuple[str, ...]
    values: Tensor  # (3, n) on the device: w_norm, g_norm, trust_ratio


class Telemetry:
    """Records ||w||, ||g|| and the trust ratio of every LARS parameter, on the device.

    Args:
        every: record one step in ``every`` (steps 0, every, 2*every, ...); the others cost one
            integer comparison. To change it on an optimizer, assign a new one:
            ``opt.telemetry = Telemetry(every=10)``.

    Names come from the param groups' ``param_names`` (build the wrapped optimizer from
    ``model.named_parameters()``); without them a parameter is ``param_groups[g][i]``.
    """

    def __init__(self, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self._entries: list[_Entry] = []
        self._step = 0
        self._hooked: Any = None
        self._names_cache: dict[tuple[int, tuple[int, ...]], tuple[str, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A copy must hook its own optimizer's step (optimizer copies drop their hooks, as torch.optim's do).
        return {**self.__dict__, "_hooked": None}

    # -- recording (called by the optimizer inside step) --------------------------------------

    # Under torch.compile(opt.step) this runs eagerly (a graph break): traced, the Python step counter
    # and entry list would be guarded on and recompile the step at every step.
    @torch.compiler.disable
    def record(
        self,
        optimizer: Any,
        group_index: int,
        params: list[Tensor],
        w_norm: Tensor,
        g_norm: Tensor,
        trust_ratio: Tensor,
    ) -> None:
        """Keep one param group's norms and trust ratios of the current step (no host sync)."""
        if self._hooked is not optimizer:
            # The step counter advances after every optimizer.step(), recorded or not.
            optimizer.register_step_post_hook(self._end_step)
            self._hooked = optimizer
        if self._step % self.every != 0 or not params:
            return
        names = self._names(optimizer, group_index, params)
        values = torch.stack((w_norm.detach(), g_norm.detach(), trust_ratio.detach()))
        self._entries.append(_Entry(self._step, group_index, names, values))

    def _end_step(self, *_: Any) -> None:
        self._step += 1

    def _names(self, optimizer: Any, group_index: int, params: list[Tensor]) -> tuple[str, ...]:
        key = (group_index, tuple(id(p) for p in params))
        names = self._names_cache.get(key)
        if names is None:
            group = optimizer.param_groups[group_index]
            given = group.get("param_names")
            position = {id(p): i for i, p in enumerate(group["params"])}
            names = tuple(
                given[position[id(p)]] if given else f"param_groups[{group_index}][{position[id(p)]}]"
                for p in params
            )
            self._names_cache[key] = names
        return names

    # -- reading (host copies, on demand) -----------------------------------------------------

    def __len__(self) -> int:
        """The number of (step, param group) entries held."""
        return len(self._entries)

    @property
    def device_values(self) -> list[Tensor]:
        """The raw (3, n) device tensors held (w_norm, g_norm, trust_ratio rows), in record order."""
        return [entry.values for entry in self._entries]

    def clear(self) -> None:
        """Drop everything recorded (the step counter keeps running)."""
        self._entries.clear()

    def _host_values(self) -> list[Tensor]:
        """Every entry's values as host float64, with one device-to-host copy per device."""
        by_device: dict[torch.device, list[int]] = {}
        for index, entry in enumerate(self._entries):
            by_device.setdefault(entry.values.device, []).append(index)
        host: list[Tensor] = [torch.empty(0)] * len(self._entries)
        for indices in by_device.values():
            joined = torch.cat([self._entries[i].values.to(torch.float64) for i in indices], dim=1).cpu()
            widths = [self._entries[i].values.shape[1] for i in indices]
            for i, part in zip(indices, joined.split(widths, dim=1), strict=True):
                host[i] = part
        return host

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per (step, parameter), ordered by step, then group, then position in the group."""
        records = []
        for entry, values in zip(self._entries, self._host_values(), strict=True):
            for name, (w, g, t) in zip(entry.names, values.t().tolist(), strict=True):
                records.append(dict(zip(FIELDS, (entry.step, entry.group, name, w, g, t), strict=True)))
        return records

    def history(self) -> dict[str, LayerHistory]:
        """Per parameter name (in first-seen order): its steps, norms and trust ratios."""
        columns: dict[str, list[list[float]]] = {}
        for record in self.to_records():
            column = columns.setdefault(record["param"], [[], [], [], []])
            for values, field in zip(column, ("step", *_FLOAT_FIELDS), strict=True):
                values.append(record[field])
        return {
            name: LayerHistory(
                torch.tensor(steps, dtype=torch.int64),
                torch.tensor(w, dtype=torch.float64),
                torch.tensor(g, dtype=torch.float64),
                torch.tensor(t, dtype=torch.float64),
            )
            for name, (steps, w, g, t) in columns.items()
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write the records as CSV (columns ``FIELDS``); returns the path."""
        return write_records(self.to_records(), path, "csv")

    def to_json(self, path: str | Path) -> Path:
        """Write the records as a JSON list of objects; returns the path."""
        return write_records(self.to_records(), path, "json")

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Draw the trust ratio of every layer over steps into an image file (needs matplotlib)."""
        return plot_trust_ratios(self.to_records(), path, title=title)


def write_records(records: list[dict[str, Any]], path: str | Path, fmt: str) -> Path:
    """Write telemetry records as ``"csv"`` or ``"json"``; floats round-trip exactly."""
    path = Path(path)
    if fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            for record in records:
                writer.writerow({**record, **{f: repr(float(record[f])) for f in _FLOAT_FIELDS}})
    elif fmt == "json":
        # NaN/inf (a diverging run) are written as JSON's non-standard NaN/Infinity, as Python and pandas read
        # them.
        path.write_text(json.dumps([{f: record[f] for f in FIELDS} for record in records], indent=1))
    else:
        raise ValueError(f"format must be 'csv' or 'json', got {fmt!r}")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records written by ``to_csv``/``to_json`` (the format comes from the suffix)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"telemetry files end in .csv or .json, got {path.name}")
    return [
        {
            "step": int(row["step"]),
            "group": int(row["group"]),
            "param": str(row["param"]),
            **{f: float(row[f]) for f in _FLOAT_FIELDS},
        }
        for row in rows
    ]


def plot_trust_ratios(records: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Trust ratio per layer over steps: lines (log scale) above, a layer-by-step heat map below."""
    try:
        import matplotlib
        from matplotlib import cm, colors
        from matplotlib.figure import Figure  # not pyplot: no global backend or figure state touched
    except ImportError as error:
        raise ImportError("plotting telemetry needs matplotlib: pip install matplotlib") from error
    if not records:
        raise ValueError("no telemetry recorded yet: run some optimizer steps with telemetry=True first")

    names = list(dict.fromkeys(r["param"] for r in records))
    steps = sorted({r["step"] for r in records})
    row_of = {name: i for i, name in enumerate(names)}
    col_of = {step: i for i, step in enumerate(steps)}
    grid = [[math.nan] * len(steps) for _ in names]
    for r in records:
        grid[row_of[r["param"]]][col_of[r["step"]]] = r["trust_ratio"] if r["trust_ratio"] > 0 else math.nan

    fig = Figure(figsize=(8, 7.5), layout="constrained")
    lines, heat = fig.subplots(2, 1, height_ratios=(1, 1.2))
    palette = matplotlib.colormaps["viridis"]
    shade = colors.Normalize(0, max(len(names) - 1, 1))
    for i, name in enumerate(names):
        lines.plot(steps, grid[i], color=palette(shade(i)), linewidth=1.2, label=name)
    lines.set_yscale("log")
    lines.set_xlabel("step")
    lines.set_ylabel("trust ratio")
    lines.grid(True, which="both", alpha=0.3)
    if len(names) <= 10:
        lines.legend(fontsize=7, loc="best")
    else:
        fig.colorbar(cm.ScalarMappable(shade, palette), ax=lines, label="layer (input → output)")

    finite = [v for row in grid for v in row if v > 0 and math.isfinite(v)]
    log_grid = [[math.log10(v) if v > 0 and math.isfinite(v) else math.nan for v in row] for row in grid]
    half = (steps[-1] - steps[0]) / (len(steps) - 1) / 2 if len(steps) > 1 else 0.5
    image = heat.imshow(
        log_grid,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(steps[0] - half, steps[-1] + half, len(names) - 0.5, -0.5),
        vmin=math.log10(min(finite)) if finite else None,
        vmax=math.log10(max(finite)) if finite else None,
    )
    if len(names) <= 40:
        heat.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 15 else 8)
    else:
        heat.set_ylabel("layer (input → output)")
    heat.set_xlabel("step")
    fig.colorbar(image, ax=heat, label="log10 trust ratio")
    fig.suptitle(title or "LARS trust ratio per layer")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
