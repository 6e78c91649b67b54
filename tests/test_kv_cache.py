"""StaticKVCache: position-indexed writes, commit / commit_path / rollback by length."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_rt.models import StaticKVCache

LAYERS, CAP, HKV, D = 2, 12, 1, 2


def _cache():
    return StaticKVCache(LAYERS, CAP, HKV, D)


def _kv(values, layer):
    """Distinct K and V contents per slot and layer: value v -> K = v + 100*layer, V = -K."""
    k = torch.tensor(values, dtype=torch.float32).add(100 * layer)[None, :, None, None].expand(1, -1, HKV, D)
    return k.clone(), (-k).clone()


def _committed(cache, layer):
    return [float(x) for x in cache.k[layer][0, : cache.length, 0, 0]]


def test_commit_rollback_and_room():
    c = _cache()
    assert c.length == 0
    for layer in range(LAYERS):
        c.write(layer, 0, *_kv([1, 2, 3], layer))
    c.commit(3)
    assert c.length == 3 and _committed(c, 1) == [101, 102, 103]
    assert torch.equal(c.v[1][0, :3, 0, 0], torch.tensor([-101.0, -102, -103]))
    c.rollback(1)
    assert c.length == 1
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="rollback"):
            c.rollback(bad)
    with pytest.raises(ValueError, match="KV cache full"):
        c.commit(CAP)
    c.commit(CAP - 1)
    assert c.length == CAP
    with pytest.raises(ValueError, match="KV cache full"):
        c.ensure_room(1)
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(1, 0, 1, 2)


def test_commit_path_gathers_accepted_nodes():
    c = _cache()
    c.write(0, 0, *_kv([7, 8], 0))
    c.write(1, 0, *_kv([7, 8], 1))
    c.commit(2)
    # a tree in slots 2.. holding nodes 10..16; accept nodes at offsets 0, 2, 5
    for layer in range(LAYERS):
        c.write(layer, 2, *_kv(list(range(10, 17)), layer))
    c.commit_path([0, 2, 5])
    assert c.length == 5
    assert _committed(c, 0) == [7, 8, 10, 12, 15]
    assert _committed(c, 1) == [107, 108, 110, 112, 115]
    assert [float(x) for x in c.v[1][0, :5, 0, 0]] == [-107, -108, -110, -112, -115]
    for bad in ([2, 1], [0, 0]):
        with pytest.raises(ValueError, match="node_slots"):
            c.commit_path(bad)
    assert c.length == 5  # a refused commit changes nothing


def test_commit_path_rejects_negative_slots():
    """A negative offset would copy a committed entry over another: refuse it."""
    c = _cache()
    c.write(0, 0, *_kv([1, 2, 3], 0))
    c.commit(3)
    with pytest.raises(ValueError, match="node_slots"):
        c.commit_path([-1, 0])
    assert c.length == 3 and _committed(c, 0) == [1, 2, 3]


# --- property test against a python list model ------------------------------------------------

@st.composite
def programs(draw):
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["write", "commit", "rollback", "commit_path"]))
        ops.append((kind, draw(st.integers(0, 2 ** 16)), draw(st.integers(0, 2 ** 16))))
    return ops


@settings(max_examples=150, deadline=None)
@given(programs())
def test_cache_matches_list_model(program):
    """Random writes (only into uncommitted slots), commits, rollbacks and path commits keep the
    committed contents equal to a plain python list."""
    cache = _cache()
    slots = [None] * CAP   # what each slot holds (None: never written, zeros)
    length = 0
    counter = 1000
    for kind, a, b in program:
        free = CAP - length
        if kind == "write" and free:
            start = length + a % free
            n = 1 + b % (CAP - start)
            values = list(range(counter, counter + n))
            counter += n
            for layer in range(LAYERS):
                cache.write(layer, start, *_kv(values, layer))
            slots[start:start + n] = [float(v) for v in values]
        elif kind == "commit":
            n = a % (free + 2)
            if n > free:
                with pytest.raises(ValueError):
                    cache.commit(n)
            else:
                cache.commit(n)
                length += n
        elif kind == "rollback":
            n = a % (length + 1)
            cache.rollback(n)
            length = n
        elif kind == "commit_path" and free:
            # a strictly increasing subset of the free offsets, chosen by the bits of a
            offsets = [i for i in range(free) if (a >> i) & 1][: 1 + b % free]
            cache.commit_path(offsets)
            chosen = [slots[length + s] for s in offsets]
            slots[length:length + len(chosen)] = chosen
            length += len(chosen)
        assert cache.length == length
        for layer in range(LAYERS):
            expected = [0.0 if s is None else s + 100 * layer for s in slots[:length]]
            assert _committed(cache, layer) == expected, (kind, a, b)
            assert [-float(x) for x in cache.v[layer][0, :length, 0, 0]] == expected
