"""Worker-to-loader transport: a bounded ring of reused shared-memory slots.

A worker process builds a batch, and the loader's process must see it. Allocating a fresh
shared-memory segment per batch (``shm_open``, ``ftruncate``, a page fault per 4 KiB on
both sides, a file descriptor passed through a socket, ``munmap``) costs more than building
the batch (DESIGN.md §7). Here each worker owns :data:`SLOTS_PER_WORKER` slots by default:
shared-memory buffers created once, sent to the loader's process once, and reused:

* while a worker builds a batch, the buffer allocator of :mod:`scmf_loader.buffers` (which
  every gathered CSR batch and every padded / dense / rank / binned output comes from)
  carves its arrays straight out of the claimed slot, so the kernels write the output into
  shared memory and the batch crosses the process boundary with **no copy**; leaves built
  elsewhere (obs codes, cell ids, a transform's own tensors, views of the memory map) are
  copied into the slot once;
* the worker sends only the slot number and the layout (offsets, dtypes, shapes); the
  loader's process views the slot (:meth:`LoaderRing.unpack`);
* a slot is handed back to its worker (its flag, in a small shared array, reset to 0) once
  nothing in the loader's process views it any more: the reference count of the slot's
  storage falls back to the ring's own (a batch the caller keeps is never overwritten).
  With CUDA and ``pin_memory``, slots are page-locked (``cudaHostRegister``) so that
  ``batch.to("cuda", non_blocking=True)`` copies straight from the slot, and a slot is
  handed back only after an event recorded on the current stream has completed;
* a worker that finds none of its slots free (the caller holds many batches) falls back to
  a fresh segment for that batch (:class:`Packed`): correct, only slower; a slot too small
  for a batch is replaced by a larger one (sent again, once).

The worker-side allocator hook replaces ``scmf_loader.buffers.empty`` in worker processes
only (:func:`install_arena`); the loader's own process is never patched.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from scmf_loader import buffers
from scmf_loader.batch import CSRBatch
from scmf_loader.errors import ScmfError

__all__ = ["SLOTS_PER_WORKER", "LoaderRing", "Packed", "RingFlags", "Slotted", "WorkerRing", "build", "flatten"]

#: default slots per worker: the DataLoader's prefetch depth (2) plus the batch the caller
#: holds and the one being fetched next
SLOTS_PER_WORKER = 4
_ALIGN = 64
_MIN_SLOT = 1 << 20
_MIN_REF = 64 << 10  # smaller leaves are copied: cheaper than resolving a reference


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- structure of an output -------------------------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    index: int


def flatten(x: Any, leaves: list[torch.Tensor]) -> Any:
    """The structure of a loader output with each tensor replaced by a :class:`_Leaf`
    pointing into ``leaves``: CSR batches, dicts, lists and tuples are walked; anything
    else (numbers, strings, numpy scalars) is kept as it is (pickled)."""
    if isinstance(x, torch.Tensor):
        leaves.append(x)
        return _Leaf(len(leaves) - 1)
    if isinstance(x, np.ndarray) and x.dtype != object:
        leaves.append(torch.from_numpy(np.ascontiguousarray(x)))
        return ("ndarray", _Leaf(len(leaves) - 1))
    if isinstance(x, CSRBatch):
        arrays = [flatten(t, leaves) for t in (x.indptr, x.indices, x.values, x.cell_ids)]
        return ("csr", x.n_genes, arrays, _flatten_columns(x._obs, leaves), _flatten_columns(x._stats, leaves))
    if isinstance(x, dict):
        return ("dict", {k: flatten(v, leaves) for k, v in x.items()})
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        return (type(x).__name__, [flatten(v, leaves) for v in x])
    return ("value", x)


def _flatten_columns(cols: Any, leaves: list[torch.Tensor]) -> Any:
    """A CSR batch's obs or stats as stored: a lazy one is built here as ``(names, 2-D
    block)``, which crosses as one leaf (not one strided column each) and is split into its
    columns on first access on the other side, as in-process."""
    if callable(cols):
        cols = cols()
    if isinstance(cols, tuple) and len(cols) == 2 and isinstance(cols[1], torch.Tensor):
        return ("columns", list(cols[0]), flatten(cols[1].contiguous(), leaves))
    return flatten(cols, leaves)


def build(structure: Any, leaves: list[torch.Tensor]) -> Any:
    """The output again from :func:`flatten`'s structure and (new) leaves."""
    if isinstance(structure, _Leaf):
        return leaves[structure.index]
    kind = structure[0]
    if kind == "ndarray":
        return leaves[structure[1].index].numpy()
    if kind == "csr":
        _, n_genes, arrays, obs, stats = structure
        return CSRBatch(*(build(a, leaves) for a in arrays), n_genes, build(obs, leaves), build(stats, leaves))
    if kind == "columns":
        return (structure[1], build(structure[2], leaves))
    if kind == "dict":
        return {k: build(v, leaves) for k, v in structure[1].items()}
    if kind in ("list", "tuple"):
        items = [build(v, leaves) for v in structure[1]]
        return items if kind == "list" else tuple(items)
    return structure[1]


def _views(base: torch.Tensor, layout: list[Any], resolve: Callable[[Any], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The leaves of a layout: ``(start, dtype, shape)`` a view of ``base`` at byte
    ``start``; ``(-1, reference, shape)`` ``resolve(reference)``."""
    storage = base.untyped_storage()
    offset = base.storage_offset()
    out = []
    for start, dtype, shape in layout:
        if start < 0:
            if resolve is None:
                raise ScmfError("a worker sent a memory-map reference but the loader cannot resolve it")
            out.append(resolve(dtype).view(shape))
            continue
        n = math.prod(shape)
        if n and (offset + start) % dtype.itemsize == 0:  # one set_: ~2x cheaper than slice + views
            out.append(torch.empty(0, dtype=dtype).set_(storage, (offset + start) // dtype.itemsize, shape))
        else:
            out.append(base[start : start + n * dtype.itemsize].view(dtype).view(shape))
    return out


class Packed:
    """The fallback: an output copied into one fresh shared-memory buffer (one file
    descriptor crosses the process boundary instead of one per tensor)."""

    def __init__(self, item: Any) -> None:
        leaves: list[torch.Tensor] = []
        self.structure = flatten(item, leaves)
        self.layout = []
        offset = 0
        for t in leaves:
            self.layout.append((offset, t.dtype, tuple(t.shape)))
            offset += _aligned(_nbytes(t))
        storage = torch.UntypedStorage._new_shared(max(offset, 1))
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage)[:offset]
        for t, view in zip(leaves, _views(self.buffer, self.layout), strict=True):
            view.copy_(t)

    def unpack(self) -> Any:
        """The output again, as views of the one buffer."""
        return build(self.structure, _views(self.buffer, self.layout))


# ---- shared flags -----------------------------------------------------------------------
class RingFlags:
    """Two int32 per slot in shared memory. ``array``: 0 = free (the worker may claim it),
    otherwise the iteration tag of the batch written into it (the loader's process resets it
    to 0). ``seen``: the generation of the slot storage the loader's process holds (a
    worker sends its storage again until the loader has it: a message can be discarded).
    Made in the loader's process before workers start; workers inherit or unpickle it."""

    def __init__(self, n_workers: int, per_worker: int = SLOTS_PER_WORKER) -> None:
        self.n_workers = n_workers
        self.per_worker = per_worker
        self.flags = torch.zeros((2, max(n_workers * per_worker, 1)), dtype=torch.int32).share_memory_()
        self._views()

    def _views(self) -> None:
        both = self.flags.numpy()
        self.array, self.seen = both[0], both[1]

    def __getstate__(self) -> dict[str, Any]:
        return {"n_workers": self.n_workers, "per_worker": self.per_worker, "flags": self.flags}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views()


# ---- worker side ------------------------------------------------------------------------
_arena = threading.local()
_original_empty: Callable[..., np.ndarray] | None = None


def _arena_empty(shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """``buffers.empty`` in a worker: carved from the claimed slot when one is active."""
    slot = getattr(_arena, "slot", None)
    if slot is not None:
        out = slot.carve(shape, dtype)
        if out is not None:
            return out
    assert _original_empty is not None
    return _original_empty(shape, dtype)


def install_arena() -> None:
    """Route ``scmf_loader.buffers.empty`` (and ``zeros``) through the active slot. Called
    in worker processes only, once."""
    global _original_empty
    if _original_empty is None:
        _original_empty = buffers.empty
        buffers.empty = _arena_empty


@dataclass
class _Slot:
    storage: torch.UntypedStorage
    mem: np.ndarray  # uint8 view of the storage
    tensor: torch.Tensor  # uint8 tensor over the storage
    generation: int = 0
    cursor: int = 0

    @classmethod
    def create(cls, nbytes: int) -> _Slot:
        size = max(_MIN_SLOT, -(-nbytes // _MIN_SLOT) * _MIN_SLOT)
        storage = torch.UntypedStorage._new_shared(size)
        tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
        generation = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF or 1  # never 0
        return cls(storage, tensor.numpy(), tensor, generation)

    @property
    def base(self) -> int:
        return self.tensor.data_ptr()

    def carve(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray | None:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = _aligned(self.cursor)
        if start + n > len(self.mem):
            return None
        self.cursor = start + n
        return self.mem[start : start + n].view(dtype).reshape(shape)

    def holds(self, t: torch.Tensor) -> bool:
        p, n = t.data_ptr(), _nbytes(t)
        return n > 0 and t.is_contiguous() and self.base <= p and p + n <= self.base + len(self.mem)


@dataclass
class Slotted:
    """A worker's batch in slot ``slot`` (the slot's storage rides along the first time,
    and after the slot was replaced by a larger one)."""

    slot: int
    generation: int
    storage: torch.UntypedStorage | None
    layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
    structure: Any


@dataclass
class WorkerRing:
    """A worker's slots (made lazily in the worker process) and their claim logic."""

    flags: RingFlags
    worker: int
    slots: dict[int, _Slot] = field(default_factory=dict)

    def claim(self, tag: int) -> int | None:
        """A free slot of this worker (global slot number), now marked ``tag``; or None."""
        first = self.worker * self.flags.per_worker
        for i in range(first, first + self.flags.per_worker):
            if self.flags.array[i] == 0:
                self.flags.array[i] = tag
                return i
        return None

    def produce(self, make: Callable[[], Any], tag: int, mapped: Callable[[torch.Tensor], Any] | None = None) -> Any:
        """``make()`` built into a claimed slot and returned as a :class:`Slotted` (or a
        :class:`Packed` when every slot is taken). ``mapped(t)``: a reference the loader's
        process resolves to the same bytes in its own memory map (e.g.
        :meth:`~scmf_loader.store.DatasetStore.map_ref`), or None; a large leaf with one is
        sent as that reference instead of being copied."""
        index = self.claim(tag)
        if index is None:
            return Packed(make())
        slot = self.slots.get(index)
        if slot is not None:
            slot.cursor = 0
        _arena.slot = slot
        try:
            item = make()
        except BaseException:
            self.flags.array[index] = 0
            raise
        finally:
            _arena.slot = None
        return self._pack(index, slot, item, mapped)

    def _pack(self, index: int, slot: _Slot | None, item: Any, mapped: Callable[[torch.Tensor], Any] | None) -> Slotted:
        leaves: list[torch.Tensor] = []
        structure = flatten(item, leaves)
        inside = [slot is not None and slot.holds(t) for t in leaves]
        refs = {}
        if mapped is not None:  # views of the memory map: the loader's process maps them itself
            for i, t in enumerate(leaves):
                ref = None if inside[i] or _nbytes(t) < _MIN_REF else mapped(t)
                if ref is not None:
                    refs[i] = ref
                    inside[i] = True  # nothing to copy
        cursor = slot.cursor if slot is not None else 0
        extra = sum(_aligned(_nbytes(t)) for t, ok in zip(leaves, inside, strict=True) if not ok)
        if slot is None or _aligned(cursor) + extra > len(slot.mem):  # a new, larger slot
            total = sum(_aligned(_nbytes(t)) for i, t in enumerate(leaves) if i not in refs)
            slot = self.slots[index] = _Slot.create(total + total // 4)
            inside = [i in refs for i in range(len(leaves))]
            cursor = 0
        layout: list[Any] = []
        for i, (t, ok) in enumerate(zip(leaves, inside, strict=True)):
            if i in refs:
                layout.append((-1, refs[i], tuple(t.shape)))
            elif ok:
                layout.append((t.data_ptr() - slot.base, t.dtype, tuple(t.shape)))
            if ok:
                continue
            start = _aligned(cursor)
            n = _nbytes(t)
            slot.tensor[start : start + n].view(t.dtype).view(t.shape).copy_(t)
            layout.append((start, t.dtype, tuple(t.shape)))
            cursor = start + n
        storage = None if self.flags.seen[index] == slot.generation else slot.storage
        return Slotted(index, slot.generation, storage, layout, structure)


# ---- loader side ------------------------------------------------------------------------
def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


class _Held:
    """A slot storage known to the loader's process, with its reference-count baseline."""

    def __init__(self, storage: torch.UntypedStorage, generation: int, pin: bool) -> None:
        self.storage = storage
        self.generation = generation
        self.base = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.pinned = False
        if pin and storage.nbytes():
            rc = torch.cuda.cudart().cudaHostRegister(self.base.data_ptr(), storage.nbytes(), 0)
            self.pinned = int(rc) == 0
        self.baseline = _use_count(storage)

    def in_use(self) -> bool:
        return _use_count(self.storage) > self.baseline

    def release(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())
            self.pinned = False


class LoaderRing:
    """The loader process's side: slot storages received from workers, the batches handed
    out (slot, storage), and the flags it resets once a slot is no longer viewed."""

    def __init__(self, flags: RingFlags, pin: bool = False) -> None:
        self.flags = flags
        self.pin = pin and torch.cuda.is_available()
        self.known: dict[int, _Held] = {}
        self.out: deque[tuple[int, _Held]] = deque()  # handed-out batches, oldest first
        self.waiting: list[tuple[int, Any]] = []  # (slot, CUDA event) before reuse
        self.retired: list[_Held] = []  # replaced storages still viewed (pinned ones)

    def unpack(self, msg: Slotted, resolve: Callable[[Any], torch.Tensor] | None = None) -> Any:
        """The worker's output as views of its slot (registered as handed out); leaves the
        worker sent as references (see :meth:`WorkerRing.produce`) through ``resolve``."""
        if msg.storage is not None:
            old = self.known.get(msg.slot)
            if old is not None and old.pinned:
                self.retired.append(old)
            self.known[msg.slot] = _Held(msg.storage, msg.generation, self.pin)
            self.flags.seen[msg.slot] = msg.generation
        held = self.known.get(msg.slot)
        if held is None or held.generation != msg.generation:  # the protocol rules this out
            raise ScmfError(f"worker slot {msg.slot}: generation {msg.generation} was never received")
        item = build(msg.structure, _views(held.base, msg.layout, resolve))
        self.out.append((msg.slot, held))
        return item

    def reclaim(self) -> None:
        """Hand back every slot whose batch is no longer viewed (after its CUDA event)."""
        if self.out:
            keep: deque[tuple[int, _Held]] = deque()
            for slot, held in self.out:
                if held.in_use():
                    keep.append((slot, held))
                elif held.pinned:
                    event = torch.cuda.Event()
                    event.record()
                    self.waiting.append((slot, event))
                else:
                    self.flags.array[slot] = 0
            self.out = keep
        if self.waiting:
            still = []
            for slot, event in self.waiting:
                if event.query():
                    self.flags.array[slot] = 0
                else:
                    still.append((slot, event))
            self.waiting = still
        if self.retired:
            for held in [h for h in self.retired if not h.in_use()]:
                held.release()
                self.retired.remove(held)

    def forget_stale(self, tag: int) -> None:
        """Free slots claimed for an iteration other than ``tag`` whose batch never reached
        this process (discarded by the DataLoader when an iteration stopped early). Call
        only when no worker is still writing such a batch (after the new iterator's reset)."""
        held = {slot for slot, _ in self.out} | {slot for slot, _ in self.waiting}
        flags = self.flags.array
        for slot in np.flatnonzero((flags != 0) & (flags != tag)).tolist():
            if slot not in held:
                flags[slot] = 0

    def close(self) -> None:
        """Unregister pinned slots (their mappings stay alive while views exist)."""
        for held in [*self.known.values(), *self.retired]:
            held.release()
        self.known.clear()
        self.retired.clear()
