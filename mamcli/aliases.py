"""Short names for the paper's models and their neighbours, resolved to Hugging Face hub ids."""

from __future__ import annotations

# alias -> (hub id, what it is)
ALIASES: dict[str, tuple[str, str]] = {
    "bert-base": ("google-bert/bert-base-uncased", "BERT base, uncased (768 wide, 12 layers)"),
    "bert-large": ("google-bert/bert-large-uncased", "BERT large, uncased (1024 wide, 24 layers; paper's text source)"),
    "roberta-base": ("FacebookAI/roberta-base", "RoBERTa base (768, 12)"),
    "roberta-large": ("FacebookAI/roberta-large", "RoBERTa large (1024, 24)"),
    "distilbert-base": ("distilbert/distilbert-base-uncased", "DistilBERT base (768, 6)"),
    "vit-base": ("google/vit-base-patch16-224", "ViT-B/16, ImageNet-21k+1k (768, 12; paper's image source)"),
    "vit-large": ("google/vit-large-patch16-224", "ViT-L/16 (1024, 24)"),
    "deit-base": ("facebook/deit-base-patch16-224", "DeiT base (768, 12)"),
    "hubert-large": ("facebook/hubert-large-ls960-ft", "HuBERT large, CTC on LibriSpeech 960h (paper's ASR target)"),
    "hubert-base": ("facebook/hubert-base-ls960", "HuBERT base, pre-trained only (768, 12)"),
    "wav2vec2-base": ("facebook/wav2vec2-base-960h", "wav2vec 2.0 base, CTC on LibriSpeech 960h (768, 12)"),
    "wav2vec2-large": ("facebook/wav2vec2-large-960h", "wav2vec 2.0 large, CTC on LibriSpeech 960h (1024, 24)"),
    "wavlm-base-plus": ("microsoft/wavlm-base-plus", "WavLM base+, pre-trained only (768, 12)"),
    "data2vec-audio-base": ("facebook/data2vec-audio-base-960h", "data2vec-audio base, CTC (768, 12)"),
    "ast": ("MIT/ast-finetuned-audioset-10-10-0.4593", "Audio Spectrogram Transformer, AudioSet (768, 12)"),
    "whisper-base": ("openai/whisper-base", "Whisper base; the encoder is merged (512, 6)"),
    "whisper-small": ("openai/whisper-small", "Whisper small; the encoder is merged (768, 12)"),
}
