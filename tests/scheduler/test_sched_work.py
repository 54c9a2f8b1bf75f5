"""Work items and layer plans: validation and plan helpers."""
import pytest

from moe.scheduler.work import LayerPlan, Placement, WorkItem


def _item(**kw):
    base = dict(key=(0, 1), tokens=3, weight_bytes=1000, flops_per_token=60)
    base.update(kw)
    return WorkItem(**base)


BAD_ITEMS = [
    ({"tokens": -1}, "tokens"),
    ({"tokens": 1.5}, "tokens"),
    ({"weight_bytes": -5}, "weight_bytes"),
    ({"flops_per_token": True}, "flops_per_token"),
    ({"kind": "conv"}, "kind"),
    ({"copy_ready_s": -0.1}, "copy_ready_s"),
    ({"copy_ready_s": float("nan")}, "copy_ready_s"),
    ({"copy_ready_s": 0.1, "cached": True}, "cached"),
    ({"read_bytes": -1}, "read_bytes"),
]


@pytest.mark.parametrize("kw,word", BAD_ITEMS)
def test_bad_work_item_names_the_field(kw, word):
    """Every invalid field is rejected with a message naming the field and the item."""
    with pytest.raises(ValueError, match=word) as exc:
        _item(**kw)
    assert "(0, 1)" in str(exc.value)


def test_bytes_read_and_in_flight():
    """bytes_read defaults to weight_bytes; in_flight follows copy_ready_s."""
    assert _item().bytes_read == 1000
    assert _item(read_bytes=64, kind="embedding").bytes_read == 64
    assert not _item().in_flight
    assert _item(copy_ready_s=0.0).in_flight


def test_work_item_is_frozen_and_hashable():
    """Items are immutable values usable as dict keys."""
    it = _item()
    with pytest.raises(AttributeError):
        it.tokens = 4
    assert {it: 1}[_item()] == 1


def test_layer_plan_device_keys_order():
    """Device keys list cached items, then copies in flight, then new copies in copy order."""
    plan = LayerPlan(
        placement={"a": Placement.COPY, "b": Placement.DEVICE, "c": Placement.CPU, "d": Placement.COPY, "e": Placement.COPY},
        copy_order=["e", "a"],
        makespan_s=1.0,
    )
    assert plan.keys(Placement.CPU) == ["c"]
    assert plan.device_keys() == ["b", "d", "e", "a"]
