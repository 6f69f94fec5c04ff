"""Model arguments: aliases, hub ids through the Hugging Face cache, offline errors, single files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mamcli.aliases import ALIASES
from mamcli.checkpoint import resolve
from mamcli.errors import MamError


def _fake_cache(cache: Path, repo_id: str, model_dir: Path, sha: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay out a model exactly as huggingface_hub caches it: blobs, snapshots/<sha>, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    import hashlib

    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mamcli.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_hub_ids_and_aliases_through_the_cache(tiny, tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache, ALIASES["bert-large"][0], tiny("bert", layers=2))
    _fake_cache(cache, "someone/tiny-hubert", tiny("hubert-ctc", layers=2))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = _run(["merge", "bert-large", "someone/tiny-hubert", "--lam", "0.1", "-o", str(tmp_path / "o"), "--json",
              "-q"], env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    src = report["inputs"]["source"]
    assert src["hub_id"] == "google-bert/bert-large-uncased" and src["revision"] == "0123456789abcdef" * 2 + "01234567"
    # cache blobs are named by their sha256, which the report reuses
    blob = Path(os.path.realpath(Path(src["path"]) / "model.safetensors")).name
    assert src["sha256"]["model.safetensors"] == blob
    r = _run(["map", "hubert-large", "someone/tiny-hubert"], env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "mam: error: facebook/hubert-large-ls960-ft is not a local path and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE is set); download it first: hf download facebook/hubert-large-ls960-ft"]


def test_single_safetensors_file_and_beats_style_pt(tiny, tmp_path):
    import torch

    with resolve(str(tiny("hubert-ctc", layers=2) / "model.safetensors")) as ck:
        assert ck.arch().family.name == "wav2vec2" and ck.arch().num_layers == 2
    sd = {f"encoder.layers.{i}.self_attn.{p}_proj.weight": torch.randn(8, 8) for i in range(3) for p in "qkv"}
    sd["patch_embedding.weight"] = torch.randn(8, 1, 16, 16)
    torch.save({"cfg": {"encoder_layers": 3, "encoder_embed_dim": 8, "encoder_attention_heads": 2}, "model": sd},
               tmp_path / "beats.pt")
    with resolve(str(tmp_path / "beats.pt")) as ck:
        arch = ck.arch()
        assert (arch.family.name, arch.num_layers, arch.hidden, arch.heads) == ("beats", 3, 8, 2)
        name = "encoder.layers.2.self_attn.v_proj.weight"
        assert torch.equal(ck.get(name), sd[name])


def test_bad_hub_id_shape():
    with pytest.raises(MamError, match="not a path, an alias"):
        resolve("not a model!")


def test_every_alias_names_a_hub_id():
    assert {"bert-large", "bert-base", "hubert-large", "hubert-base", "wav2vec2-base", "wav2vec2-large",
            "wavlm-base-plus", "vit-base", "deit-base", "ast", "whisper-base"} <= ALIASES.keys()
    assert all(h.count("/") == 1 for h, _ in ALIASES.values())


def test_models_and_families_commands(mam):
    r = mam("models", "--format", "csv")
    assert r.code == 0 and "hubert-large,facebook/hubert-large-ls960-ft" in r.out
    r = mam("families", "--format", "json")
    names = [f["family"] for f in json.loads(r.out)]
    assert names == ["bert", "distilbert", "vit", "wav2vec2", "whisper", "beats", "timm-vit"]


def test_hash_cache_notices_changes(tmp_path):
    import hashlib
    import time

    from mamcli.checkpoint import sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest()  # from the cache
    time.sleep(0.01)
    f.write_bytes(b"b" * 1000)  # same size, new mtime
    assert sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
