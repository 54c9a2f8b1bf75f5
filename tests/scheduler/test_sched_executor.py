"""Layer executor with fake callables: order of calls, overlap, and errors from any side."""
import threading
import time

import pytest

from moe.scheduler.executor import LayerExecutor
from moe.scheduler.work import LayerPlan, Placement

C, D, P = Placement.CPU, Placement.DEVICE, Placement.COPY


def _plan():
    return LayerPlan(
        placement={"c1": C, "d1": D, "p1": P, "c2": C, "p2": P, "f1": P},
        copy_order=["p2", "p1"],  # f1 is a copy already in flight
        makespan_s=1.0,
    )


class Recorder:
    def __init__(self, fail=()):
        self.events, self.fail, self.lock = [], set(fail), threading.Lock()

    def log(self, what):
        with self.lock:
            self.events.append(what)
        if what in self.fail:
            raise RuntimeError(f"boom {what}")

    def run_cpu(self, key):
        self.log(("cpu", key))

    def start_copy(self, key):
        self.log(("copy", key))

    def run_device(self, keys):
        self.log(("device", tuple(keys)))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_runs_every_item_once_in_plan_order(threads):
    """CPU items run once each; copies follow copy_order; one device call gets cached, in-flight, then new copies."""
    rec = Recorder()
    with LayerExecutor(threads) as ex:
        ex.run(_plan(), run_cpu=rec.run_cpu, start_copy=rec.start_copy, run_device=rec.run_device)
    copies = [e for e in rec.events if e[0] == "copy"]
    assert copies == [("copy", "p2"), ("copy", "p1")]
    assert [e for e in rec.events if e[0] == "device"] == [("device", ("d1", "f1", "p2", "p1"))]
    assert sorted(e for e in rec.events if e[0] == "cpu") == [("cpu", "c1"), ("cpu", "c2")]
    assert rec.events.index(("copy", "p1")) < rec.events.index(("device", ("d1", "f1", "p2", "p1")))


def test_cpu_items_overlap_the_device_call():
    """A CPU item is already running while the device call runs (the device call sees it started)."""
    started = threading.Event()
    seen = []

    def run_cpu(key):
        started.set()
        time.sleep(0.05)

    def run_device(keys):
        seen.append(started.wait(timeout=5))

    plan = LayerPlan(placement={"c": C, "d": D}, copy_order=[], makespan_s=0.0)
    with LayerExecutor(1) as ex:
        ex.run(plan, run_cpu=run_cpu, start_copy=lambda k: None, run_device=run_device)
    assert seen == [True]


def test_empty_sides_make_no_calls():
    """A plan with no CPU items never touches the pool; one with no device items makes no device call."""
    rec = Recorder()
    ex = LayerExecutor(2)
    ex.run(LayerPlan(placement={"c": C}, copy_order=[]), run_cpu=rec.run_cpu, start_copy=rec.start_copy,
           run_device=rec.run_device)
    assert rec.events == [("cpu", "c")]
    rec2 = Recorder()
    ex2 = LayerExecutor(2)
    ex2.run(LayerPlan(placement={"d": D}, copy_order=[]), run_cpu=rec2.run_cpu, start_copy=rec2.start_copy,
            run_device=rec2.run_device)
    assert rec2.events == [("device", ("d",))] and ex2._pool is None
    ex.close()


def test_cpu_error_is_reraised_after_all_items_finish():
    """A failing CPU item's error reaches the caller only after the other CPU items and the device call are done."""
    rec = Recorder(fail={("cpu", "c1")})
    done = []

    def slow_cpu(key):
        if key == "c2":
            time.sleep(0.05)
            done.append(key)
        rec.run_cpu(key)

    with LayerExecutor(2) as ex, pytest.raises(RuntimeError, match="boom"):
        ex.run(_plan(), run_cpu=slow_cpu, start_copy=rec.start_copy, run_device=rec.run_device)
    assert done == ["c2"]
    assert any(e[0] == "device" for e in rec.events)


@pytest.mark.parametrize("failing", ["copy", "device"])
def test_copy_or_device_error_waits_for_cpu_items(failing):
    """When a copy or the device call fails, running CPU items still finish before the error propagates."""
    both_started = threading.Barrier(3)
    finished = []

    def run_cpu(key):
        both_started.wait(timeout=5)
        time.sleep(0.02)
        finished.append(key)

    def fail(*_):
        both_started.wait(timeout=5)  # both CPU items are running now, so neither can be cancelled
        raise RuntimeError(f"boom {failing}")

    calls = dict(run_cpu=run_cpu, start_copy=lambda k: None, run_device=lambda keys: None)
    calls["start_copy" if failing == "copy" else "run_device"] = fail
    with LayerExecutor(2) as ex, pytest.raises(RuntimeError, match=f"boom {failing}"):
        ex.run(_plan(), **calls)
    assert sorted(finished) == ["c1", "c2"]


def test_not_started_cpu_items_are_cancelled_on_error():
    """CPU items still queued when the device call fails are dropped, not run."""
    gate, first_started = threading.Event(), threading.Event()
    ran = []

    def run_cpu(key):
        first_started.set()
        gate.wait(timeout=5)
        ran.append(key)

    def run_device(keys):
        first_started.wait(timeout=5)  # c1 holds the only pool thread; c2, c3 are queued
        raise RuntimeError("boom device")

    plan = LayerPlan(placement={"c1": C, "c2": C, "c3": C, "d": D}, copy_order=[])
    ex = LayerExecutor(1)
    threading.Timer(0.05, gate.set).start()
    with pytest.raises(RuntimeError, match="boom device"):
        ex.run(plan, run_cpu=run_cpu, start_copy=lambda k: None, run_device=run_device)
    ex.close()
    assert ran == ["c1"]


def test_two_errors_keep_the_first_and_note_the_other():
    """With both a CPU item and the device call failing, the device error is raised with a note about the CPU one."""
    rec = Recorder(fail={("cpu", "c1"), ("device", ("d1", "f1", "p2", "p1"))})
    gate = threading.Event()

    def run_cpu(key):
        gate.wait(timeout=5)  # still running when the device call fails, so it cannot be cancelled
        rec.run_cpu(key)

    def run_device(keys):
        gate.set()
        rec.run_device(keys)

    with LayerExecutor(2) as ex, pytest.raises(RuntimeError, match="boom.*device") as exc:
        ex.run(_plan(), run_cpu=run_cpu, start_copy=rec.start_copy, run_device=run_device)
    assert any("boom ('cpu', 'c1')" in note for note in getattr(exc.value, "__notes__", []))


def test_executor_is_reusable_and_checks_threads():
    """The executor runs many layers on one pool, reopens after close, and rejects bad thread counts."""
    rec = Recorder()
    ex = LayerExecutor(2)
    for _ in range(20):
        ex.run(_plan(), run_cpu=rec.run_cpu, start_copy=rec.start_copy, run_device=rec.run_device)
    ex.close()
    ex.run(_plan(), run_cpu=rec.run_cpu, start_copy=rec.start_copy, run_device=rec.run_device)
    ex.close()
    assert sum(e[0] == "device" for e in rec.events) == 21
    with pytest.raises(ValueError, match="cpu_threads"):
        LayerExecutor(0)


def test_inline_executor_runs_cpu_items_on_the_calling_thread_and_keeps_error_order():
    """inline=True: CPU items run here, before copies and the device call; a failing item
    does not stop the others, and a device error still wins over CPU errors."""
    ex = LayerExecutor(inline=True)
    rec = Recorder(fail={"cpu c2"})
    where = []

    def run_cpu(k):
        where.append(threading.get_ident())
        rec.log(f"cpu {k}")

    with pytest.raises(RuntimeError, match="boom cpu c2") as info:
        ex.run(_plan(), run_cpu=run_cpu, start_copy=lambda k: rec.log(f"copy {k}"),
               run_device=lambda keys: rec.log("device"))
    assert where == [threading.get_ident()] * 2
    assert rec.events == ["cpu c1", "cpu c2", "copy p2", "copy p1", "device"]
    rec2 = Recorder(fail={"cpu c1", "device"})
    with pytest.raises(RuntimeError, match="boom device") as info:
        ex.run(_plan(), run_cpu=lambda k: rec2.log(f"cpu {k}"), start_copy=lambda k: None,
               run_device=lambda keys: rec2.log("device"))
    assert "boom cpu c1" in "".join(info.value.__notes__)
    assert ex._pool is None  # no thread was started


def test_layer_run_from_a_pool_thread_runs_its_cpu_items_in_place():
    """A layer started on the executor's own pool thread does not wait on itself."""
    ex = LayerExecutor()
    plan = LayerPlan(placement={"c1": C, "c2": C}, copy_order=[], makespan_s=1.0)
    where = []
    run = dict(run_cpu=lambda k: where.append(threading.get_ident()), start_copy=lambda k: None,
               run_device=lambda keys: None)
    pool = ex._get_pool()
    pool_ident = pool.submit(threading.get_ident).result()
    pool.submit(ex.run, plan, **run).result(timeout=5)
    assert where == [pool_ident, pool_ident]
    ex.close()
