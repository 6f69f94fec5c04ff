"""mam: Multimodal Attention Merging of text/image attention into speech/audio Transformers."""

__version__ = "0.1.0"
