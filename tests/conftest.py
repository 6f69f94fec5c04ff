"""Shared fixtures: tiny real checkpoints built once per session, and an in-process `mam` runner."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mamcli.tiny import save_tiny

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# ESC-10's classes read straight from its folder names ("001 - Dog bark"), not through mamcli
ESC10_CLASSES = sorted(p.name.split(" - ", 1)[1] for p in (SHARED / "esc10/ESC-10").iterdir())

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
# real pretrained weights: whisper-tiny.en ships in shared/; the others are unpacked by `make models`
REAL_MODELS = {"whisper-tiny.en": SHARED.parent / "models" / "whisper-tiny.en",
               "all-MiniLM-L6-v2": ROOT / ".cache" / "models" / "all-MiniLM-L6-v2",
               "dinov2-vits14": ROOT / ".cache" / "models" / "dinov2-vits14"}


@pytest.fixture(scope="session")
def real() -> Callable[[str], Path]:
    """``real(name)`` → folder of a real pretrained model; missing is a failure (run `make models`), never a skip."""

    def get(name: str) -> Path:
        path = REAL_MODELS[name]
        if not (path / "config.json").is_file():
            pytest.fail(f"{path} is missing: run `make models` (make test does)")
        return path

    return get


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep mam's hash cache out of the user's home during tests."""
    import os

    os.environ["MAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("mam-cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny(kind, **sizes)`` → path of a saved tiny model, built once per distinct request."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple, Path] = {}

    def make(kind: str, **kw: object) -> Path:
        key = (kind, *sorted(kw.items()))
        if key not in cache:
            name = "-".join([kind, *(f"{k}{v}" for k, v in sorted(kw.items()))]).replace(".", "_")
            cache[key] = save_tiny(kind, root / name, **kw)  # type: ignore[arg-type]
        return cache[key]

    return make


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def mam(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run the real CLI entry point in-process and capture exit code, stdout and stderr."""
    from mamcli.cli import main

    def run(*args: object) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): Whisper's
    decoder and the docs examples take hundreds of tiny steps, and on the shared 2-core machine a second thread
    mostly waits for the first while other jobs run (up to 10× slower measured), as each launched process of the
    distributed tests runs with OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
