"""What the command line prints: progress bars and the per-structure metrics table.

Used by the CLI and the demo; the engine itself reports through callbacks and return values.
"""

from __future__ import annotations

import sys

__all__ = ["print_table", "progress_bar"]


def progress_bar(desc: str, unit: str = "slice"):
    """A progress(done, total, message) callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    state = {"bar": None}

    def progress(done: int, total: int, message: str = "") -> None:
        bar = state["bar"]
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            # no rate: steps are set, not counted, so tqdm's rate would be meaningless
            bar = state["bar"] = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                "[{elapsed}<{remaining}{postfix}]",
            )
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            state["bar"] = None

    return progress


def print_table(structures: dict, out=None) -> None:
    """Per-structure metrics as a fixed-width table (on stdout unless `out` is given)."""
    out = out or sys.stdout
    header = f"{'structure':<28} {'label':>5} {'dice':>6} {'iou':>6} {'hd95 mm':>8} {'nsd':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)

    def fmt(v, width, digits):
        return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

    for name, m in structures.items():
        print(
            f"{name[:28]:<28} {m.get('label', ''):>5} {fmt(m.get('dice'), 6, 3)} "
            f"{fmt(m.get('iou'), 6, 3)} {fmt(m.get('hd95_mm'), 8, 1)} {fmt(m.get('nsd'), 6, 3)}",
            file=out,
        )
