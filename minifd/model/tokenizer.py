"""Text <-> token ids through a model directory's tokenizer.json, with BOS/EOS as the directory says."""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from minifd.errors import MinifdError

# What decoding gives for bytes that stop partway through a UTF-8 character.
INCOMPLETE_CHARACTER = "\ufffd"


# The special tokens tokenizer_config.json may name; chat templates see them as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(self, tokenizer, bos_id, add_bos, eos_ids, special_tokens=None):
        """special_tokens: {"bos_token": "<s>", ...}, those tokenizer_config.json names."""
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        self.eos_ids = frozenset(eos_ids)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, weights_dir, config):
        """BOS and EOS come from tokenizer_config.json, generation_config.json and config.json, in that order."""
        weights_dir = Path(weights_dir)
        path = weights_dir / "tokenizer.json"
        if not path.is_file():
            raise MinifdError(f"{path}: not found (minifd reads a Hugging Face tokenizer.json)")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:
            raise MinifdError(f"{path}: cannot be read as a tokenizer ({error})") from None
        tokenizer_config = read_json_object(weights_dir / "tokenizer_config.json")
        generation_config = read_json_object(weights_dir / "generation_config.json")

        bos_id = generation_config.get("bos_token_id", config.bos_token_id)
        bos_token = _token_text(tokenizer_config.get("bos_token"))
        if bos_token is not None and tokenizer.token_to_id(bos_token) is not None:
            bos_id = tokenizer.token_to_id(bos_token)
        if "add_bos_token" in tokenizer_config:
            add_bos = bool(tokenizer_config["add_bos_token"])
        else:
            # No explicit setting: do what the tokenizer.json's own post-processor does.
            add_bos = bos_id is not None and bos_id in tokenizer.encode("a", add_special_tokens=True).ids[:1]

        eos_ids = set(config.eos_token_ids)
        eos = generation_config.get("eos_token_id")
        if eos is not None:
            eos_ids.update(eos if isinstance(eos, list) else [eos])
        eos_token = _token_text(tokenizer_config.get("eos_token"))
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos_ids.add(tokenizer.token_to_id(eos_token))
        special_tokens = {name: _token_text(tokenizer_config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        return cls(tokenizer, bos_id, add_bos, eos_ids,
                   {name: text for name, text in special_tokens.items() if text is not None})

    def encode(self, text, add_bos=True):
        """str -> [token id], with BOS first when the model expects it and add_bos is set (a rendered
        chat template writes its own). Special tokens written in the text become their ids."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.add_bos else ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def special_token_ids(self, texts):
        """-> the ids of those texts that are special tokens, which decode() leaves out of the text."""
        special = {token.content: token_id for token_id, token in self.tokenizer.get_added_tokens_decoder().items()
                   if token.special}
        return {special[text] for text in texts if text in special}


class IncrementalDecoder:
    """Turns a growing token sequence into text deltas, holding back incomplete UTF-8 characters.

    Decoding tokens one by one would lose the spaces that SentencePiece-style decoders attach to a
    word's first token and split multi-byte characters across tokens, so each step decodes a short
    window that starts a few tokens back and emits only what is new.
    """

    def __init__(self, tokenizer, prompt_ids, context_tokens=5):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - context_tokens, 0)
        self.read_offset = len(self.ids)

    def push(self, token_id):
        """-> the new text that token_id completes ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        seen = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(seen) or text.endswith(INCOMPLETE_CHARACTER):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(seen) :]

    def flush(self):
        """-> whatever push() still holds back, but for a character whose last bytes never came."""
        seen = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return without_incomplete_character(text[len(seen) :])


def without_incomplete_character(text):
    """text less the U+FFFD at its end that the bytes of a cut-off character decode to."""
    return text.removesuffix(INCOMPLETE_CHARACTER)


def read_json_object(path):
    """-> the JSON object in path ({} when the file is missing or holds something else)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MinifdError(f"{path}: not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
