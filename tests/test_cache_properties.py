"""A CachedDict behaves like a plain dict, whatever is done to it, across reopening.

Hypothesis drives a CachedDict and a dict with the same random operations,
closes and reopens the CachedDict from its backend now and then (loaded or
not), and checks after every step that the two agree, and at the end that a
fresh backend holds exactly the dict.
"""

from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chanstore import CachedDict
from support import assert_same

ABSENT = "<absent>"

# Mostly a few keys, so that operations meet each other's keys; some odd, some random.
KEY_POOL = ["a", "b", "c", "a/b", "..", "ü 🎉", "%2F", "k" * 300]
pool = st.sampled_from(KEY_POOL)
keys = st.one_of(
    pool,
    pool,
    pool,
    st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        min_size=1,
        max_size=12,
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
members = st.one_of(st.integers(), st.text(max_size=4))
values = st.recursive(
    scalars | st.sets(members, max_size=3) | st.frozensets(members, max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
        | st.tuples(children, children)
    ),
    max_leaves=8,
)

_domains = itertools.count()


class CachedDictMachine(RuleBasedStateMachine):
    """The state machine; ``factory`` and ``metrics`` are set by the test that runs it."""

    factory = None
    metrics = None

    def __init__(self) -> None:
        super().__init__()
        self.domain = f"prop.m{next(_domains)}"
        self.model: dict = {}
        self.box = self.open(load=False)

    def open(self, load: bool) -> CachedDict:
        box = CachedDict(
            self.factory(self.domain), strict_mode=True, name="prop", metrics=self.metrics
        )
        if load:
            box.load()
        return box

    @initialize(items=st.dictionaries(pool, values, min_size=3, max_size=8))
    def stored_before(self, items):
        """Data the domain held before this CachedDict was opened."""
        self.factory(self.domain).set_many(items)
        for key, value in items.items():
            self.remember(key, value)

    # The model holds copies, so that a value changed in the cache cannot change it too.
    def remember(self, key, value):
        self.model[key] = copy.deepcopy(value)

    @rule(key=keys, value=values)
    def set(self, key, value):
        self.box[key] = value
        self.remember(key, value)

    # One rule per way of reading: the first read of a key caches it, so each
    # way must get its own turn at keys the cache has not seen since a reopen.
    @rule(key=keys)
    def getitem(self, key):
        if key in self.model:
            assert_same(self.box[key], self.model[key])
        else:
            with pytest.raises(KeyError):
                self.box[key]

    @rule(key=keys)
    def contains(self, key):
        assert (key in self.box) == (key in self.model)

    @rule(key=keys)
    def get(self, key):
        assert_same(self.box.get(key), self.model.get(key))

    @rule(key=keys)
    def get_with_default(self, key):
        assert_same(self.box.get(key, ABSENT), self.model.get(key, ABSENT))

    @rule(key=keys)
    def delete(self, key):
        if key in self.model:
            del self.box[key]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.box[key]

    @rule(key=keys, default=values)
    def pop(self, key, default):
        assert_same(self.box.pop(key, default), self.model.pop(key, default))

    @rule(key=keys, default=values)
    def setdefault(self, key, default):
        expected = self.model.get(key, default)
        assert_same(self.box.setdefault(key, default), expected)
        if key not in self.model:
            self.remember(key, default)

    @rule(items=st.dictionaries(keys, values, max_size=4), with_operator=st.booleans())
    def update(self, items, with_operator):
        if with_operator:
            self.box |= items
        else:
            self.box.update(items)
        for key, value in items.items():
            self.remember(key, value)

    @precondition(lambda self: self.model)
    @rule()
    def popitem(self):
        key, value = self.box.popitem()
        assert key in self.model
        assert_same(value, self.model.pop(key))

    # Clearing an empty dict tells little, and Hypothesis likes rules without arguments.
    @precondition(lambda self: len(self.model) >= 3)
    @rule()
    def clear(self):
        self.box.clear()
        self.model.clear()

    @rule(key=keys, item=values, with_editing=st.booleans())
    def append_in_place(self, key, item, with_editing):
        if not isinstance(self.model.get(key), list):
            self.box[key] = []
            self.model[key] = []
        if with_editing:
            with self.box.editing(key) as value:
                value.append(item)
        else:
            self.box[key].append(item)
            self.box.save(key)
        self.model[key].append(copy.deepcopy(item))

    @precondition(lambda self: not self.box.loaded)
    @rule()
    def load(self):
        self.box.load()

    @rule()
    def reopen(self):
        self.box.close()
        self.box = self.open(load=False)

    @rule()
    def reopen_and_load(self):
        self.box.close()
        self.box = self.open(load=True)

    @invariant()
    def same_keys(self):
        assert len(self.box) == len(self.model)
        assert sorted(self.box) == sorted(self.model)

    def teardown(self):
        stored = self.factory(self.domain).load_all()
        assert sorted(stored) == sorted(self.model)
        for key, value in self.model.items():
            assert_same(stored[key], value, f"stored[{key!r}]")
        self.box.close()


# json with fsync off behaves the same, only faster; the dict backend runs the
# base class's default bulk operations.
@pytest.mark.parametrize("backend_factory", ["json-fsync", "redis", "dict"], indirect=True)
def test_cached_dict_behaves_like_a_dict(backend_factory, metrics):
    machine = type(
        "Machine", (CachedDictMachine,), {"factory": backend_factory, "metrics": metrics}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
