"""Data-driven layer choice: compare the source's and target's per-layer representations of paired data.

Which hidden state: ``hidden_states[i + 1]`` of both models, i.e. the output of Transformer block
``i`` (attention and feed-forward), for every block i; for Whisper those of the encoder (the last
one after the encoder's final LayerNorm, as transformers returns it). Pooling: the mean over valid
positions only (audio frames inside the clip's true length, via the model's own frame-length formula:
Whisper pads every clip to 30 s and keeps ceil(samples / 320) of its 1500 frames; text tokens with
attention_mask = 1, [CLS]/[SEP] included). Only pooled vectors are kept, batch by batch.

Under a launcher (:mod:`mamcli.distributed`) each process encodes its share of the very batches one process
encodes (audio and text), the pooled vectors are gathered to the main process, and it alone scores all pairs:
the scores and the ranking are those of one process, number for number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamcli.checkpoint import Checkpoint
from mamcli.data import Clip, Dataset
from mamcli.distributed import ALONE, Processes, read_batches
from mamcli.errors import MamError
from mamcli.families import FAMILIES, Family, check_compatible, check_roles
from mamcli.layers import parse_layer_map
from mamcli.metrics import ORIENTATION, RANK_METRICS, layer_scores, ranking
from mamcli.models import (
    AudioModel,
    TextModel,
    compute_dtype,
    default_batch_size,
    load_audio_model,
    load_text_model,
)
from mamcli.report import peak_rss_mib, versions

HIDDEN_STATE = "hidden_states[i + 1]: the output of Transformer block i (after attention and feed-forward)"
POOLING = "mean over valid positions: audio frames within the clip's length, text tokens with attention_mask=1"


@dataclass
class RankOptions:
    metric: str = "swd"
    top_k: int | None = None  # default: min(8, number of target layers)
    n_projections: int = 200
    seed: int = 0
    batch_size: int | None = None  # default: 1 on CPU, 8 on an accelerator
    layer_map: str | None = None
    strict: bool = False
    device: str = "cpu"
    dtype: str | None = None  # compute dtype (--dtype), as for evaluate

    def metrics(self) -> tuple[str, ...]:
        if self.metric == "all":
            return RANK_METRICS
        if self.metric not in RANK_METRICS:
            raise MamError(f"--metric must be one of {', '.join(RANK_METRICS)} or all; got {self.metric!r}")
        return (self.metric,)


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def pooled_audio(am: AudioModel, clips: list[Clip], batch_size: int,
                 ticker: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Clip id → (layers, hidden) pooled vectors of the audio model; ``ticker(clips done, total)``."""
    return _pool_audio(am, list(am.batches(clips, batch_size)), ticker)


@torch.no_grad()
def _pool_audio(am: AudioModel, batches: list[list[Clip]],
                ticker: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    total = sum(map(len, batches))
    encoder = am.encoder()
    for batch in batches:
        inputs = am.inputs([c.audio for c in batch])
        hs = encoder(**inputs, output_hidden_states=True).hidden_states[1:]
        mask = am.valid_frames(inputs, [len(c.audio) for c in batch], hs[0].shape[1]).to(hs[0].device)
        pooled = torch.stack([_pool(h, mask) for h in hs], 1)
        out.update({c.item.id: pooled[k].float().cpu().numpy() for k, c in enumerate(batch)})
        if ticker:
            ticker(len(out), total)
    return out


def text_batches(texts: dict[str, str], batch_size: int) -> list[list[str]]:
    """Clip ids in batches of transcripts of similar length, shortest first (little padding)."""
    ids = sorted(texts, key=lambda k: (len(texts[k]), k))
    return [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]


def pooled_text(tm: TextModel, texts: dict[str, str], batch_size: int,
                ticker: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Clip id → (layers, hidden) pooled vectors of the text model, on the clip's transcript."""
    return _pool_text(tm, texts, text_batches(texts, batch_size), ticker)


@torch.no_grad()
def _pool_text(tm: TextModel, texts: dict[str, str], batches: list[list[str]],
               ticker: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    total = sum(map(len, batches))
    limit = getattr(tm.tokenizer, "model_max_length", 512)
    limit = min(limit if isinstance(limit, int) and limit < 100_000 else 512,
                getattr(tm.model.config, "max_position_embeddings", 512))
    for chunk in batches:
        enc = tm.tokenizer([texts[k] for k in chunk], padding=True, truncation=True, max_length=limit,
                           return_tensors="pt").to(tm.model.device)
        hs = tm.model(**enc, output_hidden_states=True).hidden_states[1:]
        pooled = torch.stack([_pool(h, enc["attention_mask"]) for h in hs], 1)
        out.update({k: pooled[n].float().cpu().numpy() for n, k in enumerate(chunk)})
        if ticker:
            ticker(len(out), total)
    return out


def rank_layers(source: Checkpoint, target: Checkpoint, ds: Dataset, opts: RankOptions,
                families: tuple[Family, ...] = FAMILIES,
                progress: Callable[[str], None] | None = None,
                ticker: Callable[[int, int], None] | None = None, processes: Processes = ALONE) -> dict[str, Any]:
    """Score every target layer against its source layer and rank them, best first, per metric.
    ``progress`` gets a line per stage, ``ticker(done, total)`` the clips of each stage (main process only).
    ``processes``: under a launcher, this process encodes its share of the clips; the report is the main
    process's, the others get ``{"command": "rank-layers", "process": rank}`` (the CLI prints nothing there)."""
    started = time.perf_counter()
    progress, ticker = (progress, ticker) if processes.main else (None, None)
    metrics = opts.metrics()
    src_arch, tgt_arch = source.arch(families), target.arch(families)
    check_roles(src_arch, tgt_arch, source.spec, target.spec)
    notes = check_compatible(src_arch, tgt_arch, source.spec, target.spec)
    layer_map = parse_layer_map(opts.layer_map, src_arch.num_layers, tgt_arch.num_layers)
    top_k = min(8, tgt_arch.num_layers) if opts.top_k is None else opts.top_k
    if not 1 <= top_k <= tgt_arch.num_layers:
        raise MamError(f"--top-k must lie in 1..{tgt_arch.num_layers}; got {top_k}")
    missing_text = [i.id for i in ds.items if not i.text]
    if missing_text:
        raise MamError(f"rank-layers needs transcripts: {len(missing_text)} clip(s) have none (e.g. {missing_text[0]})")
    device = processes.device(opts.device)
    dtype = compute_dtype(opts.dtype, device)
    am = load_audio_model(target, "encode", device, dtype=dtype)
    tm = load_text_model(source, device, dtype=dtype)
    if progress:
        progress(f"reading {len(ds.items)} clips")
    shard = read_batches(ds, am, opts.batch_size or default_batch_size(am.model), processes, opts.strict, ticker)
    if len(shard.items) < 2:
        raise MamError(f"rank-layers needs at least 2 usable clips; got {len(shard.items)}")
    if progress:
        progress("encoding audio")
    mine = _pool_audio(am, shard.batches, ticker)
    if progress:
        progress("encoding text")
    texts = {i.id: i.text or "" for i in shard.items}
    parts = processes.gather((mine, _pool_text(tm, texts, processes.shard(text_batches(texts, opts.batch_size or 8)),
                                               ticker)))
    if parts is None:
        return {"command": "rank-layers", "process": processes.rank}
    audio = {k: v for a, _ in parts for k, v in a.items()}
    text = {k: v for _, t in parts for k, v in t.items()}
    ids = [i.id for i in shard.items]  # clip order; a clip's audio and text meet by its id, unique in a Dataset
    a = np.stack([audio[k] for k in ids])  # (pairs, target layers, hidden)
    t = np.stack([text[k] for k in ids])   # (pairs, source layers, hidden)
    results: dict[str, Any] = {}
    for metric in metrics:
        scores = [layer_scores(a[:, i], t[:, layer_map[i]], metric, opts.n_projections, opts.seed)
                  for i in range(tgt_arch.num_layers)]
        order, rank = ranking(scores, metric)
        results[metric] = {"orientation": ORIENTATION[metric], "scores": scores, "rank": rank, "order": order,
                           "top_k": sorted(order[:top_k])}
    return {
        "command": "rank-layers",
        "inputs": {"source": {**source.describe(), "family": src_arch.family.name},
                   "target": {**target.describe(), "family": tgt_arch.family.name}, "data": ds.describe()},
        "hidden_state": HIDDEN_STATE, "pooling": POOLING,
        "dtype": str(next(am.model.parameters()).dtype).removeprefix("torch."), "layer_map": layer_map,
        "primary_metric": metrics[0], "top_k": top_k, "n_projections": opts.n_projections, "seed": opts.seed,
        "metrics": results, "samples": ids, "skipped_clips": len(shard.bad), "bad_clips": shard.bad, "notes": notes,
        "processes": processes.size, "clips_per_process": shard.clips_per_process,
        "versions": versions(), "wall_time_s": round(time.perf_counter() - started, 3),
        "peak_rss_mib": peak_rss_mib(),
    }


def ranking_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target layer: its source layer, then score and rank per metric."""
    rows = []
    for i, j in enumerate(report["layer_map"]):
        row: dict[str, Any] = {"layer": i, "source_layer": j}
        for metric, r in report["metrics"].items():
            row[metric] = r["scores"][i]
            row[f"{metric}_rank"] = r["rank"][i]
        rows.append(row)
    return rows
