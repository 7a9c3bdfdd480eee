"""Callbacks that do not keep their owner alive.

A call's parts are given callbacks into the objects that own them: the session's reply
sender and acknowledgement, the durability's snapshot, the voice turns' amendment of what
the caller heard. Passed as bound methods, each is a reference back to its owner, so a
call's objects formed reference cycles that only the cyclic collector frees, and a node
runs that collector rarely (:mod:`callmesh.gc_tuning`): ended calls piled up between
collections, and their memory stayed fragmented after. Given through :func:`weak_method`,
the owner holds its parts and the parts hold nothing of it: reference counting frees a
call the moment its last reference goes, at hang-up.

The owner outlives every use: it holds the part that calls back, and its tasks are
cancelled before it is dropped. A callback called after its owner was freed is a bug and
raises :class:`ReferenceError`, as a :func:`weakref.proxy` would.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def weak_method(method: Callable[P, R]) -> Callable[P, R]:
    """``method`` (a bound method) as a callable holding its object weakly. An ``async``
    method stays one: calling the result returns the method's coroutine, without a
    coroutine layer of its own (the session's sender runs once per reply frame)."""
    func = method.__func__  # type: ignore[attr-defined]
    owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
    name = func.__qualname__

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        obj = owner()
        if obj is None:
            raise ReferenceError(f"{name}: its owner was freed")
        result: R = func(obj, *args, **kwargs)
        return result

    call.__qualname__ = f"weak({name})"
    return call
