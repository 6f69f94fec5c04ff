"""Every file mam reads, fed random JSON values and random bytes: a valid result or one line with exit 1
(exit 2 for a recipe's unknown key), never an internal error (exit 3) or a traceback."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["metrics", "order", "lams", "q", "k", "v", "recipe", "weight_map", "swd",
                                         "name", "layouts", "layer", "attention", "parts", "families", "x"]),
                        inner, max_size=4), max_leaves=12)
PROBE = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def models(tiny):
    return tiny("bert", layers=2), tiny("hubert-ctc", layers=2)


def _clean(r, allowed: tuple[int, ...] = (0, 1)) -> None:
    assert r.code in allowed, (r.code, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    if r.code:
        assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("mam: error: "), r.err


def _probe(mam: Callable, name: str, content: bytes, args: Callable[[Path, Path], list],
           allowed: tuple[int, ...] = (0, 1)) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / name
        f.write_bytes(content)
        _clean(mam(*args(f, Path(d) / "out")), allowed)


READERS: dict[str, tuple[str, Callable[..., list], tuple[int, ...]]] = {
    "ranking": ("ranking.json", lambda m, f, o: ["merge", *m, "--lam", "0.1", "--layers", f"top:1:{f}", "-o", o],
                (0, 1)),
    "lams": ("lams.json", lambda m, f, o: ["merge", *m, "--lams", f, "-o", o], (0, 1)),
    "arch-map": ("map.json", lambda m, f, o: ["families", "--arch-map", f], (0, 1)),
    "recipe": ("recipe.yaml", lambda m, f, o: ["merge", *m, "--config", f, "-o", o], (0, 1, 2)),
}


@pytest.mark.parametrize("reader", READERS)
@PROBE
@given(value=JSON)
def test_readers_take_any_json(reader, value, models, mam):
    name, args, allowed = READERS[reader]
    _probe(mam, name, json.dumps(value).encode(), lambda f, o: args(models, f, o), allowed)


@pytest.mark.parametrize("reader", READERS)
@PROBE
@given(data=st.binary(max_size=64))
def test_readers_take_any_bytes(reader, data, models, mam):
    name, args, allowed = READERS[reader]
    _probe(mam, name, data, lambda f, o: args(models, f, o), allowed)


@PROBE
@given(value=JSON)
def test_model_config_and_shard_index_take_any_json(value, models, mam):
    with tempfile.TemporaryDirectory() as d:
        for broken in ("config.json", "model.safetensors.index.json"):
            target = Path(d) / broken
            shutil.copytree(models[1], target)
            (target / broken).write_text(json.dumps(value))
            _clean(mam("merge", models[0], target, "--lam", "0.1", "-o", Path(d) / "out"))
            shutil.rmtree(Path(d) / "out", ignore_errors=True)


@PROBE
@given(data=st.binary(max_size=64))
def test_a_broken_hash_cache_is_rebuilt(data, models, mam, tmp_path_factory):
    import os

    cache = Path(os.environ["MAM_CACHE_DIR"]) / "sha256.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(data)
    with tempfile.TemporaryDirectory() as d:
        r = mam("merge", *models, "--lam", "0.1", "-o", Path(d) / "out", "-q")
    assert r.code == 0, r.err
