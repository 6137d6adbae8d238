"""Progress of a run: one bar per stage with the time left for the whole stage, and one summary line per stage.

A stage is a sequence of items (a teacher, a student, a model's evaluation). The code that does an item takes a
progress factory and opens its own bar (tqdm's arguments: total, initial, desc, an iterable); Stage.part is such a
factory, and its bars feed the stage's one bar instead of drawing their own. The stage's total is the sum of its
items' sizes: those announced by the items begun so far, and for the others the size given up front or the mean
of the announced ones. Work that was done before (a resumed item's `initial`, an item skipped whole) moves the bar
without counting towards its rate, so the time left is that of the work still to do at the speed of this run.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterable, Iterator, Optional


class Stage:
    def __init__(self, factory: Optional[Callable], desc: str, items: int, unit: str = "step",
                 size: Optional[float] = None):
        self.desc, self.items, self.size = desc, max(0, items), size
        self.done_units = 0.0  # units of the items ended so far
        self.ended = 0  # items ended
        self.announced: list = []  # sizes the items begun so far gave
        self.current: Optional[float] = None  # size of the item under way
        self.current_units = 0.0  # units of it counted so far
        self.bar = (factory(total=self._total(), desc=desc, unit=unit, leave=False, smoothing=0.05)
                    if factory is not None and items > 0 else None)

    # ------------------------------------------------------------------ sizes
    def _estimate(self) -> float:
        if self.size is not None:
            return float(self.size)
        return round(sum(self.announced) / len(self.announced)) if self.announced else 1.0

    def _total(self) -> int:
        open_items = max(0, self.items - self.ended - (self.current is not None))
        return int(round(self.done_units + (self.current or 0.0) + open_items * self._estimate()))

    def _advance(self, units: float, counts: bool) -> None:
        """units more done; counts=False for work done before this process (it must not raise the rate)."""
        if self.bar is None or units == 0:
            return
        if counts:
            self.bar.update(units)
            return
        self.bar.n += units
        for attr in ("last_print_n", "initial"):  # the rate: since the last print, or since the start
            if hasattr(self.bar, attr):
                setattr(self.bar, attr, getattr(self.bar, attr) + units)
        self.bar.refresh()

    def _retotal(self) -> None:
        if self.bar is not None:
            self.bar.total = self._total()
            self.bar.refresh()

    # ------------------------------------------------------------------ items
    def part(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: Optional[str] = None,
             initial: float = 0, **_) -> "_Part":
        """A progress factory for one item's code: the item begins with this call and ends at its close()."""
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.current = float(total) if total is not None else self._estimate()
        self.announced.append(self.current)
        self.current_units = 0.0
        if self.bar is not None and desc:
            self.bar.set_description(f"{self.desc} {min(self.ended + 1, self.items)}/{self.items}: {desc}",
                                     refresh=False)
        self._retotal()
        self.current_units = float(initial)
        self._advance(float(initial), counts=False)
        return _Part(self, iterable)

    def end_item(self) -> None:
        """The item under way (or, when none was begun, the next one, skipped whole) has ended."""
        if self.current is None:  # skipped: done before, by an earlier process
            size = self._estimate()
            self.done_units += size
            self.ended += 1
            self._advance(size, counts=False)
            self._retotal()
            return
        rest = self.current - self.current_units  # an item that stopped early (or overran) ends at its size
        self.done_units += self.current
        self.ended += 1
        self.current = None
        self._advance(max(rest, 0.0), counts=False)
        self._retotal()

    @contextlib.contextmanager
    def item(self) -> Iterator[None]:
        """Around one item's code: ends the item afterwards whether or not the code opened a bar."""
        before = len(self.announced)
        yield
        if self.current is not None or len(self.announced) == before:
            self.end_item()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Part:
    """One item's bar, drawn on its stage's."""

    def __init__(self, stage: Stage, iterable: Optional[Iterable]):
        self.stage, self.iterable, self.closed = stage, iterable, False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def update(self, n: float = 1) -> None:
        self.stage.current_units += n
        self.stage._advance(n, counts=True)

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kw) -> None:
        if self.stage.bar is not None:
            self.stage.bar.set_postfix(ordered_dict, refresh=refresh, **kw)

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        if self.stage.bar is not None:
            self.stage.bar.set_postfix_str(s, refresh=refresh)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stage.end_item()


def summary(stage: str, info: Dict) -> str:
    """One line of what a stage made, from the info it returned (state.json keeps the same numbers)."""
    try:
        if stage == "data":
            val = f", {info['val']} validation" if info.get("val") else ""
            return f"{info['train']} training{val} and {info['test']} test samples"
        if stage == "specialists":
            return f"{info['teachers']} teachers"
        if stage == "cache":
            s = f"top-{info['top_k']}, {info['bytes'] / 2**20:.1f} MiB, true class kept for " \
                f"{100 * info['teacher_recall']:.1f}% of rows"
            if "bayes_teacher_recall" in info:
                s += f" (Bayes teacher {100 * info['bayes_teacher_recall']:.1f}%)"
            return s
        if stage == "student":
            secs = [v["seconds"] for v in info.values() if isinstance(v, dict)]
            return f"{len(secs)} students, {min(secs):.0f}-{max(secs):.0f}s each" if secs else "no students"
        if stage == "eval":
            maps = info["map"]
            best = max((r for r in maps if r not in ("specialists", "bayes")), key=lambda r: maps[r], default=None)
            s = f"{len(maps)} models"
            if best is not None:
                s += f"; best student {best} mAP {100 * maps[best]:.2f}%"
            if "specialists" in maps:
                s += f", specialists {100 * maps['specialists']:.2f}%"
            return s
        if stage == "report":
            files = info.get("files", {})
            return f"{len(files)} files in {os.path.dirname(next(iter(files.values())))}" if files else ""
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass  # a stage's info from another version of kc: the line says less
    return ""
