"""Model arguments: aliases, hub ids through the Hugging Face cache (as huggingface_hub lays it out, tree listing
included), offline switches, ``name@revision``, ``pytorch_model*.bin`` repos, single files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from mamcli.aliases import ALIASES
from mamcli.checkpoint import resolve
from mamcli.errors import MamError

COMMIT = "0123456789abcdef" * 2 + "01234567"
COMMIT_V1 = "89abcdef01234567" * 2 + "89abcdef"
# what `mam` fetches from a repo with safetensors weights (config, tokenizer, processor files and the weights)
SAFETENSORS_DOWNLOAD = ["*.json", "*.txt", "*.model", "*.safetensors"]
# files a Hub repo holds besides those: the cached tree listing names them, the snapshot lacks them
REPO_EXTRAS = {"README.md": b"# a model card\n", ".gitattributes": b"*.bin filter=lfs\n",
               "flax_model.msgpack": b"\x80" * 64}


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def _hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], patterns: list[str] | None,
               commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Lay out a repo as huggingface_hub 2.x's snapshot_download leaves it.

    blobs/ (LFS files named by their sha256, others by their git blob id), snapshots/<commit>/ with symlinks to only
    the files matching ``patterns``, refs/<ref>, and the tree listing trees/<commit>.json naming every repo file.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for d in (repo / "blobs", repo / "refs", repo / "trees", snap):
        d.mkdir(parents=True, exist_ok=True)
    listing = {}
    for name, data in files.items():
        entry = {"size": len(data), "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith((".safetensors", ".bin", ".msgpack")):
            entry |= {"lfs_sha256": hashlib.sha256(data).hexdigest(), "lfs_size": len(data)}
        listing[name] = entry
    for name in filter_repo_objects(list(files), allow_patterns=patterns):
        blob = listing[name].get("lfs_sha256") or listing[name]["blob_id"]
        (repo / "blobs" / blob).write_bytes(files[name])
        if not (snap / name).is_symlink():
            (snap / name).symlink_to(Path("../../blobs") / blob)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    if ref:
        (repo / "refs" / ref).write_text(commit)
    return snap


def _env(**env: str) -> dict[str, str]:
    """The caller's environment without its Hugging Face settings, plus ``env``."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    return {**keep, **env}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mamcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, offline Hugging Face cache, set the way huggingface_hub reads its settings (constants at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_and_aliases_through_the_cache(tiny, tmp_path):
    """A model mam downloaded itself is found offline (HF_HOME and HF_HUB_OFFLINE), and TRANSFORMERS_OFFLINE counts."""
    cache = tmp_path / "hf" / "hub"
    bert = _files(tiny("bert", layers=2))
    _hub_cache(cache, ALIASES["bert-large"][0], {**bert, **REPO_EXTRAS, "pytorch_model.bin": b"\0" * 99},
               SAFETENSORS_DOWNLOAD)
    _hub_cache(cache, "someone/tiny-hubert", {**_files(tiny("hubert-ctc", layers=2)), **REPO_EXTRAS},
               SAFETENSORS_DOWNLOAD)
    r = _run(["merge", "bert-large", "someone/tiny-hubert", "--lam", "0.1", "-o", str(tmp_path / "o"), "--json",
              "-q"], _env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    src = report["inputs"]["source"]
    assert src["hub_id"] == "google-bert/bert-large-uncased" and src["revision"] == COMMIT
    assert src["format"] == "safetensors" and src["files"] == ["model.safetensors"]
    # cache blobs are named by their sha256, which the report reuses
    blob = Path(os.path.realpath(Path(src["path"]) / "model.safetensors")).name
    assert blob == src["sha256"]["model.safetensors"] == hashlib.sha256(bert["model.safetensors"]).hexdigest()
    r = _run(["map", "hubert-large", "someone/tiny-hubert"], _env(HF_HUB_CACHE=str(cache), TRANSFORMERS_OFFLINE="1"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "mam: error: facebook/hubert-large-ls960-ft is not a local path and not in the Hugging Face cache "
        "(TRANSFORMERS_OFFLINE is set); download it first: hf download facebook/hubert-large-ls960-ft"]


def test_offline_cache_with_tree_listing(hub, tiny):
    files = {**_files(tiny("hubert-ctc", layers=2)), **REPO_EXTRAS}
    snap = _hub_cache(hub, "someone/tiny-hubert", files, SAFETENSORS_DOWNLOAD)
    listed = {f.path for f in huggingface_hub.get_cached_repo_tree("someone/tiny-hubert")}
    assert listed == set(files) and not (snap / "README.md").exists()  # huggingface_hub reads the listing we wrote
    with resolve("someone/tiny-hubert") as ck:
        assert ck.root == snap and ck.revision == COMMIT and ck.arch().num_layers == 2
        assert ck.describe()["format"] == "safetensors"
    (snap / "vocab.json").unlink()  # a file of the download is missing: the snapshot is incomplete, not used
    with pytest.raises(MamError) as e:
        resolve("someone/tiny-hubert@main")
    assert str(e.value) == ("someone/tiny-hubert is only partly in the Hugging Face cache (vocab.json missing) and "
                            "HF_HUB_OFFLINE is set; download it first: hf download someone/tiny-hubert --revision main")


class _FakeHub:
    """Stands in for huggingface_hub.snapshot_download online: it writes what the real one writes (tree listing, the
    allowed files only) from ``repos`` instead of the network; cache look-ups run the real function."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.downloads: list[tuple[str, str | None, list[str] | None]] = []
        self.real = huggingface_hub.snapshot_download

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                 local_files_only: bool = False, **kw: object) -> str:
        if local_files_only:
            return self.real(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True, **kw)
        self.downloads.append((repo_id, revision, allow_patterns))
        ref = None if revision == COMMIT else revision or "main"
        return str(_hub_cache(Path(constants.HF_HUB_CACHE), repo_id, self.repos[repo_id], allow_patterns, ref=ref))


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_bin_only_repo_is_downloaded_and_then_found_offline(hub, tiny, monkeypatch):
    """A repo without safetensors: its sharded pytorch_model*.bin is fetched (not training_args.bin), read with
    weights_only, and the same patterns find it offline afterwards."""
    import argparse

    model = tiny("hubert-ctc", layers=2)
    state = _state(model)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    files = {k: v for k, v in _files(model).items() if k != "model.safetensors"} | REPO_EXTRAS
    for shard, keys in shards.items():
        buf = io.BytesIO()
        torch.save({k: state[k] for k in keys}, buf)
        files[shard] = buf.getvalue()
    files["pytorch_model.bin.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}).encode()
    buf = io.BytesIO()
    torch.save(argparse.Namespace(lr=1e-4), buf)  # a Trainer pickle: never fetched, never unpickled
    files["training_args.bin"] = buf.getvalue()
    fake = _FakeHub({"someone/bin-hubert": files})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with resolve("someone/bin-hubert") as ck:
        assert ck.describe()["format"] == "torch" and ck.describe()["files"] == sorted(shards)
        assert sorted(ck.names()) == names
        assert all(torch.equal(ck.get(k), state[k]) for k in names)
        assert not (ck.root / "training_args.bin").exists() and not (ck.root / "README.md").exists()
    bins = ["*.json", "*.txt", "*.model", "pytorch_model*.bin"]
    assert fake.downloads == [("someone/bin-hubert", None, SAFETENSORS_DOWNLOAD), ("someone/bin-hubert", COMMIT, bins)]
    for offline in (False, True):  # cached now: neither online nor offline goes back to the Hub
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        with resolve("someone/bin-hubert") as ck:
            assert ck.fmt == "torch" and ck.revision == COMMIT and sorted(ck.names()) == names
    assert len(fake.downloads) == 2


def test_pytorch_model_bin_directory(tiny, tmp_path):
    """A folder with only pytorch_model.bin (a legacy save) is read with weights_only; the report says so."""
    model = tiny("hubert-ctc", layers=2)
    state = _state(model)
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_bytes((model / "config.json").read_bytes())
    torch.save(state, d / "pytorch_model.bin")
    with resolve(str(d)) as ck:
        assert ck.describe() == {"spec": str(d), "path": str(d), "hub_id": None, "revision": None, "format": "torch",
                                 "files": ["pytorch_model.bin"]}
        assert ck.arch().family.name == "wav2vec2"
        assert all(torch.equal(ck.get(k), v) for k, v in state.items()) and len(ck.names()) == len(state)


@pytest.mark.parametrize("content,needle", [
    ([torch.zeros(2)], "not a state dict of tensors"),
    ({"w": torch.zeros(2), "step": 3}, "not a state dict of tensors"),
    (torch.nn.Linear(2, 2), "will not unpickle (weights_only=True)"),
    (b"not a pickle", "cannot read PyTorch checkpoint"),
])
def test_bin_that_is_not_a_state_dict(content, needle, tiny, tmp_path, mam):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{}")
    if isinstance(content, bytes):
        (d / "pytorch_model.bin").write_bytes(content)
    else:
        torch.save(content, d / "pytorch_model.bin")
    r = mam("map", d, tiny("hubert-ctc", layers=2))
    assert r.code == 1 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mam: error: {d / 'pytorch_model.bin'}: ") and needle in lines[0]


def test_revision_per_model(hub, tiny, tmp_path, mam):
    """`org/name@rev` picks a branch, tag or commit per model; --revision / revision= is the default for the others."""
    v0, v1 = tiny("hubert-ctc", layers=2), tiny("hubert-ctc", layers=2, seed=1)
    _hub_cache(hub, "someone/tiny-hubert", _files(v0), SAFETENSORS_DOWNLOAD)
    _hub_cache(hub, "someone/tiny-hubert", _files(v1), SAFETENSORS_DOWNLOAD, commit=COMMIT_V1, ref="v1")
    _hub_cache(hub, "someone/tiny-bert", _files(tiny("bert", layers=2)), SAFETENSORS_DOWNLOAD)
    name = "hubert.encoder.layers.1.attention.q_proj.weight"
    for spec, default, commit, weights in [("someone/tiny-hubert", None, COMMIT, v0),
                                           ("someone/tiny-hubert@v1", None, COMMIT_V1, v1),
                                           (f"someone/tiny-hubert@{COMMIT_V1}", "main", COMMIT_V1, v1),
                                           ("someone/tiny-hubert", "v1", COMMIT_V1, v1),
                                           ("someone/tiny-hubert@main", "v1", COMMIT, v0)]:
        with resolve(spec, default) as ck:
            assert (ck.spec, ck.hub_id, ck.revision) == (spec, "someone/tiny-hubert", commit)
            assert torch.equal(ck.get(name), _state(weights)[name])
    assert not torch.equal(_state(v0)[name], _state(v1)[name])
    r = mam("merge", "someone/tiny-bert", "someone/tiny-hubert@v1", "--lam", "0.1", "-o", tmp_path / "o", "--json",
            "-q")
    assert r.code == 0, r.err
    inputs = json.loads(r.out)["inputs"]
    assert (inputs["source"]["revision"], inputs["target"]["revision"]) == (COMMIT, COMMIT_V1)
    # a local folder whose name holds '@' is a folder
    local = tmp_path / "hubert@v1"
    local.symlink_to(v1, target_is_directory=True)
    with resolve(str(local), "main") as ck:
        assert ck.hub_id is None and ck.revision is None and torch.equal(ck.get(name), _state(v1)[name])


@pytest.mark.parametrize("spec,message", [
    ("someone/tiny-hubert@", "'someone/tiny-hubert@': the revision after '@' is empty (write NAME@BRANCH, NAME@TAG "
                             "or NAME@COMMIT)"),
    ("bert-large@", "'bert-large@': the revision after '@' is empty (write NAME@BRANCH, NAME@TAG or NAME@COMMIT)"),
    ("someone/x@../../etc", "'someone/x@../../etc': '../../etc' is not a valid revision"),
    ("someone/x@v1@v2", "'someone/x@v1@v2': 'v1@v2' is not a valid revision"),
    ("./no/such@v1", "./no/such@v1 does not exist"),
    ("@main", "'@main' is not a path, an alias (see `mam models`) or a hub id"),
    ("someone/tiny-hubert@nope", "someone/tiny-hubert is not a local path and not in the Hugging Face cache "
                                 "(HF_HUB_OFFLINE is set); download it first: hf download someone/tiny-hubert "
                                 "--revision nope"),
])
def test_bad_revisions(spec, message, hub, tiny, mam, tmp_path):
    _hub_cache(hub, "someone/tiny-hubert", _files(tiny("hubert-ctc", layers=2)), SAFETENSORS_DOWNLOAD)
    with pytest.raises(MamError) as e:
        resolve(spec)
    assert str(e.value) == message
    r = mam("map", spec, tiny("hubert-ctc", layers=2))
    assert (r.code, r.out, r.err) == (1, "", f"mam: error: {message}\n")
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
    assert names == ["bert", "distilbert", "vit", "dinov2", "ast", "wav2vec2", "whisper", "beats", "timm-vit"]


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
