"""minifd: a small, readable Llama-family inference engine built on the ideas of FlashDecoding++."""

__version__ = "0.1.0"


def load(weights_dir, device="auto", **options):
    """Load a Hugging Face Llama checkpoint directory or a llama.cpp .gguf file; returns an Engine with generate()."""
    from minifd.engine import Engine

    return Engine.load(weights_dir, device=device, **options)
