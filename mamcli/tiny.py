"""Small random checkpoints of every family, built from real transformers configs.

Nothing can be downloaded in CI, so the demo, the tests and the benchmark build their models
here and save them with ``save_pretrained``; loading then goes through the real code path.
Run ``python -m mamcli.tiny KIND DIR`` to make one by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

# character vocabulary in the layout of facebook/wav2vec2-base-960h (CTC blank = <pad> = 0)
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


def _speech(cls: str, hidden: int, layers: int, heads: int, stable: bool = False) -> Any:
    """``stable``: HuBERT-large's layout (pre-norm layers, layer-normed conv front end)."""
    import transformers

    return getattr(transformers, cls)(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        conv_dim=(16, 16, 16, 16), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, vocab_size=len(CTC_VOCAB), pad_token_id=0, ctc_loss_reduction="mean",
        do_stable_layer_norm=stable, feat_extract_norm="layer" if stable else "group")


def _text(cls: str, hidden: int, layers: int, heads: int) -> Any:
    import transformers

    return getattr(transformers, cls)(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=2 * hidden, vocab_size=64, max_position_embeddings=64)


def _image(cls: str, hidden: int, layers: int, heads: int, **extra: Any) -> Any:
    import transformers

    return getattr(transformers, cls)(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=2 * hidden, **extra)


# kind -> (model class, config builder)
KINDS: dict[str, tuple[str, Any]] = {
    "bert": ("BertForMaskedLM", lambda h, n, a: _text("BertConfig", h, n, a)),
    "bert-model": ("BertModel", lambda h, n, a: _text("BertConfig", h, n, a)),
    "roberta": ("RobertaModel", lambda h, n, a: _text("RobertaConfig", h, n, a)),
    "distilbert": ("DistilBertModel", lambda h, n, a: __import__("transformers").DistilBertConfig(
        dim=h, n_layers=n, n_heads=a, hidden_dim=2 * h, vocab_size=64, max_position_embeddings=64)),
    "vit": ("ViTModel", lambda h, n, a: _image("ViTConfig", h, n, a, image_size=32, patch_size=16)),
    "deit": ("DeiTModel", lambda h, n, a: _image("DeiTConfig", h, n, a, image_size=32, patch_size=16)),
    "ast": ("ASTForAudioClassification", lambda h, n, a: _image(
        "ASTConfig", h, n, a, max_length=100, num_mel_bins=128, patch_size=16, frequency_stride=16, time_stride=16,
        num_labels=10)),
    "hubert-ctc": ("HubertForCTC", lambda h, n, a: _speech("HubertConfig", h, n, a)),
    "hubert-ctc-stable": ("HubertForCTC", lambda h, n, a: _speech("HubertConfig", h, n, a, stable=True)),
    "wav2vec2-ctc": ("Wav2Vec2ForCTC", lambda h, n, a: _speech("Wav2Vec2Config", h, n, a)),
    "wavlm-ctc": ("WavLMForCTC", lambda h, n, a: _speech("WavLMConfig", h, n, a)),
    "data2vec-audio-ctc": ("Data2VecAudioForCTC", lambda h, n, a: _speech("Data2VecAudioConfig", h, n, a)),
    # Whisper's encoder and decoder alone, small mel input (merge tests: no processor)
    "whisper-model": ("WhisperModel", lambda h, n, a: __import__("transformers").WhisperConfig(
        d_model=h, encoder_layers=n, decoder_layers=1, encoder_attention_heads=a, decoder_attention_heads=a,
        encoder_ffn_dim=2 * h, decoder_ffn_dim=2 * h, num_mel_bins=16, max_source_positions=32,
        max_target_positions=32, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)),
    # whisper-tiny.en's layout (80 mels, 30 s windows, its vocabulary and tokenizer), random and narrow
    "whisper": ("WhisperForConditionalGeneration", lambda h, n, a: _whisper(h, n, a)),
    "whisper-aec": ("WhisperForAudioClassification", lambda h, n, a: _whisper(
        h, n, a, num_labels=10, classifier_proj_size=h // 2)),
}

# tokenizer files (and the English-only generation settings) come from the real checkpoint in shared/
WHISPER_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "models" / "whisper-tiny.en"


def _whisper(hidden: int, layers: int, heads: int, **extra: Any) -> Any:
    """whisper-tiny.en's vocabulary, special tokens and 30 s input; two decoder layers."""
    import transformers

    return transformers.WhisperConfig(
        d_model=hidden, encoder_layers=layers, decoder_layers=2, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, vocab_size=51864, pad_token_id=50256,
        bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257, begin_suppress_tokens=[220, 50256],
        suppress_tokens=[], **extra)


def save_tiny(kind: str, path: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
              dtype: torch.dtype = torch.float32, max_shard_size: str | None = None) -> Path:
    """Build a randomly initialised model of ``kind`` and save it (with its processor where the kind has one)."""
    import transformers

    path = Path(path)
    if kind == "timm-vit":
        return save_timm_vit(path, hidden, layers, heads, seed)
    if kind in ("beats", "beats-ft"):
        return save_beats(path, hidden, layers, heads, seed, finetuned=kind == "beats-ft")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join([*KINDS, 'timm-vit'])}")
    cls, make_config = KINDS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(make_config(hidden, layers, heads))
    with torch.no_grad():  # fresh inits leave biases at 0 and norms at 1: jitter them so merges show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model = model.to(dtype)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if "-ctc" in kind:
        save_ctc_processor(path)
    if kind in ("bert", "bert-model", "distilbert"):
        save_wordpiece_tokenizer(path)
    if kind == "ast":
        transformers.ASTFeatureExtractor(num_mel_bins=128, max_length=100, sampling_rate=16000).save_pretrained(path)
    if kind == "whisper":
        save_whisper_processor(path)
    if kind == "whisper-aec":
        transformers.WhisperFeatureExtractor().save_pretrained(path)
    return path


def save_whisper_processor(path: Path) -> None:
    """whisper-tiny.en's real tokenizer, a default 80-mel feature extractor, and an English-only generation
    config (start of transcript, no timestamps) that ``generate()`` accepts."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    if not (WHISPER_REFERENCE / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{WHISPER_REFERENCE}: the whisper-tiny.en tokenizer files are missing")
    tok = WhisperTokenizer.from_pretrained(WHISPER_REFERENCE)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tok).save_pretrained(path)
    gen = GenerationConfig.from_pretrained(WHISPER_REFERENCE)
    gen.alignment_heads = [[0, 0]]  # the real heads name layers this model does not have
    gen.suppress_tokens = []
    gen.forced_decoder_ids = None  # the prompt comes from no_timestamps_token_id, as for new checkpoints
    gen.save_pretrained(path)  # replaces the one save_pretrained derived from the config


# lower-case characters as WordPiece tokens: any English transcript tokenizes without [UNK]
TEXT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,'-",
              *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]


def save_wordpiece_tokenizer(path: Path) -> None:
    """A real BERT tokenizer over a character vocabulary (fits the tiny models' 64-token embedding)."""
    from transformers import BertTokenizer

    (path / "vocab.txt").write_text("\n".join(TEXT_VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)


def save_ctc_processor(path: Path) -> None:
    """A real character-level CTC tokenizer and a 16 kHz feature extractor, as wav2vec2-base-960h has."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab_file = path / "vocab.json"
    vocab_file.write_text(json.dumps({c: i for i, c in enumerate(CTC_VOCAB)}))
    tok = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
                               do_lower_case=False)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)


def save_beats(path: Path, hidden: int, layers: int, heads: int, seed: int, finetuned: bool = False) -> Path:
    """A BEATs checkpoint in the official layout, ``{"cfg", "model"[, "label_dict"]}``, as BEATs_iter3+ has:
    deep norm, relative position bias with gated relative position."""
    from mamcli.beats import BeatsConfig, BeatsModel, official_state

    cfg = BeatsConfig(embed_dim=hidden // 2, encoder_layers=layers, encoder_embed_dim=hidden,
                      encoder_ffn_embed_dim=2 * hidden, encoder_attention_heads=heads, deep_norm=True,
                      relative_position_embedding=True, gru_rel_pos=True, num_buckets=32, max_distance=64,
                      conv_pos=16, conv_pos_groups=4, finetuned_model=finetuned, predictor_class=10)
    torch.manual_seed(seed)
    model = BeatsModel(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] = {"cfg": cfg.to_dict(), "model": official_state(model)}
    if finetuned:
        ckpt["label_dict"] = {f"/m/{i:02d}": i for i in range(10)}
    torch.save(ckpt, path / "BEATs_tiny.pt")
    return path / "BEATs_tiny.pt"


def save_timm_vit(path: Path, hidden: int, layers: int, heads: int, seed: int) -> Path:
    """A timm-style ViT checkpoint: fused ``blocks.{i}.attn.qkv`` and timm's config.json keys."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {"cls_token": torch.randn(1, 1, hidden, generator=g),
                                        "patch_embed.proj.weight": torch.randn(hidden, 3, 16, 16, generator=g)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes = {"norm1.weight": (hidden,), "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
                  "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
                  "mlp.fc1.weight": (2 * hidden, hidden), "mlp.fc2.weight": (hidden, 2 * hidden)}
        tensors.update({b + k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_features": hidden,
                                                  "depth": layers, "num_heads": heads}))
    return path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(f"usage: python -m mamcli.tiny KIND DIR [HIDDEN LAYERS HEADS]; kinds: {', '.join(KINDS)}, timm-vit")
    sizes = [int(x) for x in argv[2:5]]
    print(save_tiny(argv[0], argv[1], *sizes))


if __name__ == "__main__":
    main(sys.argv[1:])
