"""The driver↔worker call header: what ``pack`` sends, ``unpack`` reads back (issue 13.2)."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

import distgraph as dg
from distgraph.runtime.protocol import Call, CallHeader, Rows, pack, unpack

FLAGS = ("trace", "check_finite", "by_ref")


def round_trip(header: CallHeader, update=None, big=(), imported=()) -> Call:
    """Pack, cross a process boundary (pickle, as Ray does), split at the header, unpack."""
    args = pickle.loads(pickle.dumps(pack(header, update, big, imported)))
    assert isinstance(args[0], CallHeader)
    return unpack(args[0], args[1:])


def test_a_call_with_no_values_has_only_its_header():
    header = CallHeader(plan_id=3, step=7, task_id=11)
    assert pack(header) == (header,)
    call = round_trip(header)
    assert call.header == header
    assert call.update is None and call.feeds == {} and call.imported == []


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(FLAGS))))
def test_every_combination_of_flags_survives(flags):
    header = CallHeader(1, 2, 3, **dict(zip(FLAGS, flags)))
    got = round_trip(header).header
    assert tuple(getattr(got, f) for f in FLAGS) == flags
    assert (got.plan_id, got.step, got.task_id) == (1, 2, 3)


def test_update_feeds_and_imports_come_back_by_role():
    small, large = np.arange(3.0), np.arange(12.0).reshape(4, 3)
    header = CallHeader(
        1,
        5,
        2,
        update=True,
        inline={"s": small, "scalar": 2.5},
        big=("L",),
        imports=2,
    )
    update, imported = {"w": np.ones(2)}, [{"a": 1.0}, {"b": 2.0, "c": 3.0}]
    args = pack(header, update, [large], imported)
    # Values are top-level arguments after the header (Ray resolves only those).
    assert len(args) == 1 + 1 + 1 + 2
    call = round_trip(header, update, [large], imported)
    assert call.feeds.keys() == {"s", "scalar", "L"}
    assert np.array_equal(call.feeds["s"], small) and call.feeds["scalar"] == 2.5
    assert np.array_equal(call.feeds["L"], large)
    assert np.array_equal(call.update["w"], np.ones(2))
    assert call.imported == imported


def test_rows_are_taken_from_the_array_of_the_same_name():
    data = np.arange(20.0).reshape(10, 2)
    rows = np.array([7, 0, 3])
    header = CallHeader(1, 1, 1, inline={"x": Rows(rows), "y": np.zeros(3)}, big=("x",))
    call = round_trip(header, None, [data])
    assert np.array_equal(call.feeds["x"], data[rows])
    assert np.array_equal(call.feeds["y"], np.zeros(3))


def test_imports_without_feeds_and_an_update_without_anything_else():
    only_imports = CallHeader(1, 1, 1, imports=3)
    call = round_trip(only_imports, None, (), [{"a": 1}, {"b": 2}, {"c": 3}])
    assert call.feeds == {} and call.update is None
    assert call.imported == [{"a": 1}, {"b": 2}, {"c": 3}]
    only_update = CallHeader(1, 1, 1, update=True)
    call = round_trip(only_update, {"w": 1.0})
    assert call.update == {"w": 1.0} and call.imported == [] and call.feeds == {}


def test_the_header_is_immutable():
    header = CallHeader(1, 1, 1)
    with pytest.raises(AttributeError):
        header.step = 2  # type: ignore[misc]


def test_pack_refuses_values_the_header_does_not_announce():
    with pytest.raises(dg.ExecutionError, match=r"header\.update=False"):
        pack(CallHeader(1, 1, 1), {"w": 1.0})
    with pytest.raises(dg.ExecutionError, match=r"header\.update=True"):
        pack(CallHeader(1, 1, 1, update=True))
    with pytest.raises(dg.ExecutionError, match="1 big feeds and 0 imports"):
        pack(CallHeader(1, 1, 1, big=("x",)), None, [], [])
    with pytest.raises(dg.ExecutionError, match="0 big feeds and 2 imports"):
        pack(CallHeader(1, 1, 1, imports=2), None, [], [{}])


def test_unpack_names_the_task_when_the_count_is_off():
    with pytest.raises(dg.ExecutionError, match=r"task 4 of step 9 \(plan 2\) came with 1"):
        unpack(CallHeader(2, 9, 4), [{"stray": 1}])
