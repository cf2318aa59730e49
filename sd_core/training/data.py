"""The trainer's input: which items each step sees, read into memory and prefetched.

Each epoch's order is fixed by ``(seed, epoch)``, so a resumed run sees the same batches as an
uninterrupted one. When the train split fits in ``memory_bytes`` it is read once, as contiguous
tensors, and an epoch is one permutation of it. A larger split is read in *windows*: the epoch shuffles
the order of the latent shards, packs consecutive shards into windows that fit the budget, and shuffles
the items inside each window; only the window in use and the next are in memory. Items of one shard then
always meet in the same window, so batches mix fewer shards than a full shuffle would.

Batches are ``index_select`` on the resident tensors. In windowed reading the next window is read from disk
in a background thread while the current one trains (it starts once the batches have left the window
before: at most two windows are in memory). On a GPU a background thread also assembles the next batches
and pins them for the copy; on the CPU batches are assembled in the training thread, where a second thread
issuing torch calls per batch only took time from the step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from sd_core.encode.pairs import Pairs, PairSource


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    epoch: int  # where the data order stands after this batch (what a checkpoint records)
    position: int


class _Window:
    """Items resident in memory, with each item's row."""

    def __init__(self, source: PairSource, items: Sequence[int]) -> None:
        ordered = sorted(items)
        self.pairs: Pairs = source.load(ordered)
        self.row = {item: r for r, item in enumerate(ordered)}


class _ReadAhead:
    """One window being read in a background thread, named by ``(epoch, index in the epoch)``."""

    def __init__(self, key: tuple[int, int], read: Callable[[], _Window]) -> None:
        self.key = key
        self._result: _Window | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(read,), daemon=True, name="emoji-sd-window")
        self._thread.start()

    def _run(self, read: Callable[[], _Window]) -> None:
        try:
            self._result = read()
        except BaseException as e:  # handed to the consumer when it takes the window
            self._result = e

    def take(self) -> _Window:
        self._thread.join()
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result


class BatchSource:
    """Batches of the items ``items`` for process ``rank`` of ``world``, ``batch_size`` each."""

    def __init__(self, source: PairSource, items: Sequence[int], *, batch_size: int, world: int = 1,
                 rank: int = 0, accumulation: int = 1, seed: int = 0, memory_bytes: float = 4e9,
                 device: torch.device | str = "cpu", prefetch: int = 2) -> None:
        self.source, self.items = source, list(items)
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.global_batch = batch_size * world  # one micro-batch of every process
        self.step_items = self.global_batch * accumulation  # one optimizer step: an epoch ends on a whole one
        self.device, self.prefetch = torch.device(device), prefetch
        self.resident = len(self.items) * source.item_bytes() <= memory_bytes
        self.memory_bytes = memory_bytes
        wanted = set(self.items)
        self._groups = [[i for i in g if i in wanted] for g in source.groups()]
        self._groups = [g for g in self._groups if g]
        self._all: _Window | None = None
        self._windows: dict[int, list[list[int]]] = {}  # the last epochs' windows (read-ahead looks one epoch on)
        self._read_lock = threading.Lock()  # one window read at a time (the store is not shared across threads)
        self.windows_loaded = 0
        self.read_s = 0.0  # seconds spent reading windows (in the background, mostly)
        self.wait_s = 0.0  # seconds batch assembly waited for a window (what reading cost the steps)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch + 1)

    def windows(self, epoch: int) -> list[list[int]]:
        """The epoch's windows, in order, each a list of items in the order they are drawn."""
        g = self._generator(epoch)
        if self.resident:
            return [[self.items[i] for i in torch.randperm(len(self.items), generator=g).tolist()]]
        per_item = self.source.item_bytes()
        windows: list[list[int]] = []
        current: list[int] = []
        for gi in torch.randperm(len(self._groups), generator=g).tolist():
            group = self._groups[gi]
            if current and (len(current) + len(group)) * per_item > self.memory_bytes:
                windows.append(current)
                current = []
            current = current + group
        if current:
            windows.append(current)
        return [[w[i] for i in torch.randperm(len(w), generator=g).tolist()] for w in windows]

    def order(self, epoch: int) -> list[int]:
        return [i for w in self.windows(epoch) for i in w]

    def _epoch_windows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._windows:
            self._windows = {e: w for e, w in self._windows.items() if e >= epoch - 1}
            self._windows[epoch] = self.windows(epoch)
        return self._windows[epoch]

    def _read(self, items: list[int]) -> _Window:
        with self._read_lock:
            started = time.perf_counter()
            window = _Window(self.source, items)
            self.windows_loaded += 1
            self.read_s += time.perf_counter() - started
            return window

    def _window_for(self, epoch: int, k: int, ahead: list[_ReadAhead]) -> _Window:
        """Window ``k`` of ``epoch``: the one read ahead when it is that one, else read now."""
        if self.resident:
            if self._all is None:
                self._all = self._read(self.items)
            return self._all
        started = time.perf_counter()
        try:
            if ahead and ahead[0].key == (epoch, k):
                return ahead.pop().take()
            return self._read(self._epoch_windows(epoch)[k])
        finally:
            self.wait_s += time.perf_counter() - started

    def _read_ahead(self, key: tuple[int, int], ahead: list[_ReadAhead]) -> None:
        """Start reading window ``key`` in the background, unless it is being read already."""
        if ahead and ahead[0].key == key:
            return
        if ahead:  # a window this process's batches skipped (other processes' rows): wait for it and drop it
            ahead.pop().take()
        items = self._epoch_windows(key[0])[key[1]]
        ahead.append(_ReadAhead(key, lambda: self._read(items)))

    def _assemble(self, epoch: int, position: int) -> Iterator[Batch]:
        """This process's micro-batches from ``(epoch, position)`` on, forever, on the CPU."""
        ahead: list[_ReadAhead] = []  # at most one window being read in the background
        while True:
            windows = self._epoch_windows(epoch)
            flat = [i for w in windows for i in w]
            owner = {i: k for k, w in enumerate(windows) for i in w}
            used = len(flat) // self.step_items * self.step_items  # an epoch ends on a whole optimizer step
            last = owner[flat[used - 1]] if used else 0  # the epoch's last window with items in a step
            loaded: dict[int, _Window] = {}
            while position + self.global_batch <= len(flat):
                start = position + self.rank * self.batch_size
                mine = flat[start : start + self.batch_size]
                needed = sorted({owner[i] for i in mine})
                for k in list(loaded):
                    if k < needed[0]:
                        del loaded[k]
                for k in needed:
                    if k not in loaded:
                        loaded[k] = self._window_for(epoch, k, ahead)
                if not self.resident and len(loaded) == 1:  # the window before is let go: read the next one
                    self._read_ahead((epoch, needed[0] + 1) if needed[0] < last else (epoch + 1, 0), ahead)
                parts = []
                for k in needed:
                    rows = [loaded[k].row[i] for i in mine if owner[i] == k]
                    parts.append(loaded[k].pairs.select(rows))
                tensors = parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
                if self.device.type == "cuda":
                    tensors = {n: t.pin_memory() for n, t in tensors.items()}
                position += self.global_batch
                if position % self.step_items == 0 and position + self.step_items > len(flat):
                    yield Batch(tensors, epoch + 1, 0)
                    break
                yield Batch(tensors, epoch, position)
            epoch, position = epoch + 1, 0

    def _produce(self, epoch: int, position: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._assemble(epoch, position):
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # hand the failure to the consumer
            out.put(e)

    @property
    def threaded(self) -> bool:
        """Assemble batches in a background thread where that overlaps real waiting: pinning and copying to a
        GPU. On the CPU a batch is an ``index_select`` (well under a millisecond), and a second thread issuing
        torch ops for every batch only competes with the step for the cores (measured here: a demo step took
        260 ms with the thread against 150 ms without; the same held for windows read from disk). Windows are
        read ahead in their own thread either way, one window ahead, so a window's read overlaps the steps on
        the one before instead of the last two batches."""
        return self.prefetch > 0 and self.device.type != "cpu"

    def batches(self, epoch: int = 0, position: int = 0) -> Iterator[Batch]:
        """Micro-batches from ``(epoch, position)`` on, forever, each moved to the training device."""
        if not self.threaded:
            for item in self._assemble(epoch, position):
                item.tensors = {n: t.to(self.device) for n, t in item.tensors.items()}
                yield item
            return
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(epoch, position, out, stop), daemon=True,
                                  name="emoji-sd-batches")
        worker.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                item.tensors = {n: t.to(self.device, non_blocking=True) for n, t in item.tensors.items()}
                yield item
        finally:
            stop.set()
            worker.join(timeout=5)
