"""Hugging Face tokenizers (tokenizer.json / a tokenizer directory), read from disk only, never downloaded.

Ids follow Megatron's `HuggingFaceTokenizer`: `tokenize` is the tokenizer's own call (so special tokens
it adds by default, such as Llama's bos, are added, and data preprocessed here matches Megatron's byte
for byte), eod is the eos token, vocab_size counts added tokens (`len(tokenizer)`). A tokenizer without
a pad token pads with eod.
"""
import json
import os

from megahet.errors import MegahetError
from megahet.tokenizer.base import AbstractTokenizer

_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def _special(config: dict, key: str):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HuggingFaceTokenizer(AbstractTokenizer):
    """Tokenizer files of a Hugging Face model: a directory (tokenizer.json, tokenizer_config.json, ...)
    or a tokenizer.json file. Uses `transformers` when installed (any tokenizer it can load offline),
    else the `tokenizers` library on tokenizer.json with the special tokens named in tokenizer_config.json.
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise MegahetError(f"tokenizer {path} not found; pass a Hugging Face tokenizer directory or "
                               f"tokenizer.json to --tokenizer-model")
        self.path = path
        try:
            self._load_transformers(path)
        except ImportError:
            self._load_tokenizers(path)
        if self._eos is None:
            raise MegahetError(f"tokenizer {path} has no eos token, which marks document ends; set "
                               f"eos_token in its tokenizer_config.json")

    def _load_transformers(self, path: str) -> None:
        import transformers

        try:
            if os.path.isfile(path):
                tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
                self._apply_config(tok, os.path.dirname(path))
            else:
                tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise MegahetError(f"tokenizer {path} could not be loaded ({str(error).splitlines()[0]}); pass a "
                               f"directory with tokenizer.json or a tokenizer.json file") from None
        self._encode = lambda text: tok(text).input_ids
        self._decode = lambda ids: tok.decode(ids)
        self._vocab_size = len(tok)
        eos = tok.eos_token_id
        if eos is None:
            eos = next((tok.convert_tokens_to_ids(t) for t in _EOS_GUESSES if t in tok.get_vocab()), None)
        self._eos, self._bos = eos, tok.bos_token_id
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    @staticmethod
    def _apply_config(tok, directory: str) -> None:
        """Special tokens of a bare tokenizer.json from a tokenizer_config.json next to it, if any."""
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                config = json.load(handle)
            for key in ("eos_token", "bos_token", "pad_token"):
                if _special(config, key):
                    setattr(tok, key, _special(config, key))

    def _load_tokenizers(self, path: str) -> None:
        try:
            import tokenizers
        except ImportError:
            raise MegahetError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers or transformers "
                               "package; pip install tokenizers") from None
        file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise MegahetError(f"{path} has no tokenizer.json; without transformers installed only tokenizer.json "
                               f"files load (pip install transformers for other formats)")
        tok = tokenizers.Tokenizer.from_file(file)
        config = {}
        config_path = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                config = json.load(handle)
        vocab = tok.get_vocab(with_added_tokens=True)
        names = {key: _special(config, key) for key in ("eos_token", "bos_token", "pad_token")}
        if not names["eos_token"]:
            names["eos_token"] = next((t for t in _EOS_GUESSES if t in vocab), None)
        ids = {key: (vocab.get(name) if name else None) for key, name in names.items()}
        self._encode = lambda text: tok.encode(text).ids
        self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._eos, self._bos = ids["eos_token"], ids["bos_token"]
        self._pad = ids["pad_token"] if ids["pad_token"] is not None else self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return list(self._encode(text))

    def detokenize(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @property
    def bos(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def pad(self) -> int:
        return self._pad
