"""Generic layer executor: run a LayerPlan with CPU work, copies and device work overlapping.

    submit CPU items to the pool  ->  issue copies in copy_order  ->  one device call
    ->  join CPU items (re-raise their errors)

The executor knows nothing of tensors, streams or models: the runtime passes three
callables. `start_copy(key)` must only enqueue the copy (asynchronous on the device; the
runtime records the events its device call waits on); `run_device(keys)` is one fused
call over every device item (cached ones first, then copies in flight, then new copies
in copy order); `run_cpu(key)` computes one item on the CPU and may run on any pool
thread, so it must be thread-safe (torch and nogil Numba kernels release the GIL, which
is what lets CPU items overlap the device call). An `inline` executor (for a CPU
"device", where both sides share the cores) runs the CPU items on the calling thread
first instead; so does any executor whose run() is called from its own pool thread.

Errors: the layer always waits for every CPU item it submitted before returning or
raising, so no item is still writing into the runtime's buffers afterwards. The first
error raised wins (copy/device errors on the calling thread first, then CPU errors in
submission order); the others are attached to it as notes.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Hashable, Sequence

from moe.scheduler.work import LayerPlan, Placement

__all__ = ["LayerExecutor"]


class LayerExecutor:
    """Runs layer plans on a pool of `cpu_threads` threads (reused across layers).

    With cpu_threads=1, CPU items run one after another on one pool thread while the
    calling thread drives copies and the device, which is what the cost model assumes
    when each CPU item itself uses all cores (a parallel kernel). More pool threads let
    single-threaded CPU items run side by side.
    """

    def __init__(self, cpu_threads: int = 1, inline: bool = False) -> None:
        """inline: run CPU items on the calling thread, one after another, before the
        copies and the device call (no pool). For a CPU "device", where device work and
        CPU items share the same cores, so overlapping them gains nothing; and numba's
        and torch's parallel regions then start from one thread (see the runtime)."""
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be an int >= 1, got {cpu_threads!r}")
        self.cpu_threads = cpu_threads
        self.inline = bool(inline)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=self.cpu_threads, thread_name_prefix="moe-cpu")
            return self._pool

    def _on_pool_thread(self, pool: cf.ThreadPoolExecutor) -> bool:
        # Waiting on a pool from one of its own threads would deadlock a one-thread pool.
        return threading.current_thread() in getattr(pool, "_threads", ())

    def run(
        self,
        plan: LayerPlan,
        *,
        run_cpu: Callable[[Hashable], None],
        start_copy: Callable[[Hashable], None],
        run_device: Callable[[Sequence[Hashable]], None],
    ) -> None:
        """Execute `plan`; returns when the CPU items and the device call have returned."""
        cpu_keys = plan.keys(Placement.CPU)
        device_keys = plan.device_keys()
        futures: list[cf.Future] = []
        main_error: BaseException | None = None
        try:
            if cpu_keys:
                pool = None if self.inline else self._get_pool()
                inline = pool is None or self._on_pool_thread(pool)
                for key in cpu_keys:  # appended one by one: a failed submit still joins the rest
                    if inline:  # inline executor, or already on the pool (a layer run from a CPU item)
                        fut: cf.Future = cf.Future()
                        try:
                            fut.set_result(run_cpu(key))
                        except BaseException as exc:  # noqa: BLE001 - joined below like any item
                            fut.set_exception(exc)
                        futures.append(fut)
                    else:
                        futures.append(pool.submit(run_cpu, key))
            for key in plan.copy_order:
                start_copy(key)
            if device_keys:
                run_device(device_keys)
        except BaseException as exc:  # noqa: BLE001 - re-raised below after the CPU items finish
            main_error = exc
            for fut in futures:
                fut.cancel()  # items not started yet need not run
        errors: list[BaseException] = [] if main_error is None else [main_error]
        for fut in futures:
            if fut.cancelled():
                continue
            exc = fut.exception()  # waits for the item
            if exc is not None:
                errors.append(exc)
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also failed in the same layer: {type(other).__name__}: {other}")
        raise first

    def close(self) -> None:
        """Stop the pool threads (waits for running items); the executor can be used again after."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LayerExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
