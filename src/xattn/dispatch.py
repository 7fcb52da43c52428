"""Dispatch: which controller hooks run at a site in one attention call.

Which controllers *may* run at a site is decided once, when the session
opens (:func:`plan_sites`: static selector keys, site name and kind). Which
of those *do* run in a call depends on that call's resolution and step, and
on each controller's ``active(ctx)``: :func:`active_hooks` decides, and
returns None when nothing runs, the signal for the processor's fused path.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .hookpoints import EXPLICIT_POINTS, Controller, HookContext, HookError, HookFn
from .sites import Site

Entry = tuple[Controller, str, HookFn]


class ActiveHooks:
    """The hooks that run at one site in one call, grouped by point."""

    __slots__ = ("context", "by_point", "explicit")

    def __init__(self, context: HookContext, by_point: dict[str, list[HookFn]]):
        self.context = context
        self.by_point = by_point
        self.explicit = any(point in by_point for point in EXPLICIT_POINTS)

    def has(self, point: str) -> bool:
        return point in self.by_point

    @torch.compiler.disable  # user hooks run eagerly under torch.compile (they may read any Python state)
    def run(self, point: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.by_point.get(point)
        if not fns:
            return x
        ctx = replace(self.context, point=point)
        for fn in fns:
            out = fn(x, ctx)
            if out is None:
                continue
            if out.shape != x.shape:
                raise HookError(
                    f"hook {getattr(fn, '__qualname__', fn)} at {ctx.name} returned shape "
                    f"{tuple(out.shape)}; it must keep the input's shape {tuple(x.shape)}"
                )
            x = out
        return x


def plan_sites(controllers: list[Controller], site_list: list[Site]) -> dict[str, list[Entry]]:
    """Site name -> the (controller, point, fn) entries that may run there."""
    entries: dict[str, list[Entry]] = {}
    for controller in controllers:
        points = controller.points()
        for site in site_list:
            if controller.selector.matches_site(site):
                for point, fn in points.items():
                    if point == "context" and site.kind not in ("cross", "joint"):
                        continue
                    entries.setdefault(site.name, []).append((controller, point, fn))
    return entries


def active_hooks(entries: list[Entry] | None, context: HookContext) -> ActiveHooks | None:
    """The entries that run in this call (selector's res and steps, then ``active``), or None."""
    if not entries:
        return None
    by_point: dict[str, list[HookFn]] = {}
    decided: dict[int, bool] = {}
    for controller, point, fn in entries:
        runs = decided.get(id(controller))
        if runs is None:
            selector = controller.selector
            runs = (selector.matches_res(context.res) and selector.matches_step(context.step, context.num_steps)
                    and controller.active(context))
            decided[id(controller)] = runs
        if runs:
            by_point.setdefault(point, []).append(fn)
    return ActiveHooks(context, by_point) if by_point else None


def describe_sites(entries: dict[str, list[Entry]], site_list: list[Site]) -> str:
    """A table: per site, its kind, its path and the controllers that may run there.

    A site is *explicit* when some controller there reads ``scores`` or
    ``probs`` (it builds the map, at the calls where that controller is
    active), *fused* when its controllers use only fused points, and
    *untouched* when no controller selects it (its own processor runs).
    """
    header = ("site", "kind", "path", "controllers")
    rows = []
    for site in site_list:
        site_entries = entries.get(site.name, [])
        if not site_entries:
            rows.append((site.name, site.kind, "untouched", "-"))
            continue
        points = {point for _, point, _ in site_entries}
        path = "explicit" if points & set(EXPLICIT_POINTS) else "fused"
        names = list(dict.fromkeys(type(controller).__name__ for controller, _, _ in site_entries))
        rows.append((site.name, site.kind, path, ", ".join(names)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


__all__ = ["ActiveHooks", "Entry", "active_hooks", "describe_sites", "plan_sites"]
