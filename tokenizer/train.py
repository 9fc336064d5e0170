"""Train a byte-fallback BPE sentencepiece model, reproducibly and in seconds on a few MB of text."""
import io
import json
import logging
import os
from typing import Iterable

from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

# Fixed special ids of every model this function trains (Llama's unk/bos/eos order, pad after them).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
NUM_BYTES = 256  # byte_fallback reserves one piece per byte, so any text encodes without unk
MIN_VOCAB_SIZE = NUM_SPECIAL + NUM_BYTES + 16


def _lines_of(text: str):
    """Sentencepiece trains on lines; one long document would be skipped past max_sentence_length."""
    for line in text.split("\n"):
        if line.strip():
            yield line


def _iter_file(path: str, json_keys):
    """Lines of a .txt file, or of the json_keys fields of each record of a .jsonl/.json file."""
    if not os.path.isfile(path):
        raise MegahetError(f"tokenizer training input {path} not found; pass existing files to --input")
    as_json = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not as_json:
                if line.strip():
                    yield line.rstrip("\n")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MegahetError(f"{path}:{number} is not valid JSON; give one JSON object per line "
                                   f"or use a .txt file") from None
            for key in json_keys:
                if isinstance(record.get(key), str):
                    yield from _lines_of(record[key])


def _sentences(inputs, json_keys):
    """A path or a list/tuple of paths is read as files; any other iterable yields texts."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        for path in inputs:
            yield from _iter_file(os.fspath(path), json_keys)
        return
    for text in inputs:
        yield from _lines_of(text)


def train_sentencepiece(inputs: "Iterable[str] | str", model_prefix: str, vocab_size: int, *,
                        json_keys=("text",), input_sentence_size: int = 1_000_000,
                        max_sentence_length: int = 8192, character_coverage: float = 0.9995,
                        num_threads: int = 2, seed: int = 1234) -> str:
    """Train a BPE model and write `{model_prefix}.model` and `.vocab`; returns the .model path.

    Args:
        inputs: a file path or a list/tuple of paths (.txt is read by lines, .jsonl/.json records by
            their `json_keys` fields), or any other iterable (e.g. a generator) of texts. Texts are
            split into lines, which sentencepiece trains on.
        vocab_size: total pieces, specials and the 256 byte pieces included.
        input_sentence_size: at most this many lines are sampled (keeps big inputs fast).

    The model is byte-fallback BPE with identity normalisation and no whitespace folding, so
    `detokenize(tokenize(text)) == text` for any text. Special ids are fixed: unk 0, bos 1, eos 2, pad 3.
    Training is deterministic for a given input and seed. Files appear atomically (temp + rename).
    """
    import sentencepiece

    from megahet.data.cache import atomic_write_bytes  # here: megahet.data imports this package

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise MegahetError(f"tokenizer vocab_size {vocab_size} is too small; byte fallback needs "
                           f"at least {MIN_VOCAB_SIZE} (pass a larger --vocab-size)")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    lines = list(_sentences(inputs, json_keys))
    if not lines:
        raise MegahetError("tokenizer training input has no text; pass non-empty files to --input")
    if hasattr(sentencepiece, "set_random_generator_seed"):
        sentencepiece.set_random_generator_seed(seed)
    # Train into memory: a model_prefix would be recorded in the model and differ between runs.
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=character_coverage,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, num_threads=num_threads, minloglevel=2)
    except RuntimeError as error:
        raise MegahetError(f"sentencepiece training failed: {str(error).strip().splitlines()[-1]}; "
                           f"check the input text and --vocab-size") from None
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{processor.IdToPiece(i)}\t{processor.GetScore(i):g}\n"
                    for i in range(processor.GetPieceSize()))
    atomic_write_bytes(model_prefix + ".vocab", vocab.encode("utf-8"))
    atomic_write_bytes(model_prefix + ".model", model.getvalue())  # last: its presence means both exist
    logger.info("trained tokenizer %s.model (vocab %d) on %d lines", model_prefix, vocab_size, len(lines))
    return model_prefix + ".model"


HF_EOS, HF_PAD = "<|endoftext|>", "<|pad|>"


def train_huggingface_bpe(inputs: "Iterable[str] | str", output_dir: str, vocab_size: int, *,
                          json_keys=("text",)) -> str:
    """Train a byte-level BPE with the `tokenizers` library; writes `output_dir/tokenizer.json` and a
    `tokenizer_config.json` naming eos `<|endoftext|>` (id 0) and pad `<|pad|>` (id 1), which
    `--tokenizer-type HuggingFaceTokenizer --tokenizer-model output_dir` loads. Returns output_dir.
    Inputs are read as for `train_sentencepiece`.
    """
    try:
        import tokenizers
    except ImportError:
        raise MegahetError("training a Hugging Face tokenizer needs the tokenizers package; "
                           "pip install tokenizers") from None
    from megahet.data.cache import atomic_write_bytes, atomic_write_json

    lines = list(_sentences(inputs, json_keys))
    if not lines:
        raise MegahetError("tokenizer training input has no text; pass non-empty files to --input")
    minimum = 2 + len(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise MegahetError(f"tokenizer vocab_size {vocab_size} is too small; byte-level BPE needs at least "
                           f"{minimum} (pass a larger --vocab-size)")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[HF_EOS, HF_PAD],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, "tokenizer_config.json"),
                      {"eos_token": HF_EOS, "pad_token": HF_PAD, "tokenizer_class": "PreTrainedTokenizerFast",
                       "model_max_length": 1 << 30})
    atomic_write_bytes(os.path.join(output_dir, "tokenizer.json"), tok.to_str().encode("utf-8"))
    logger.info("trained tokenizer %s (vocab %d) on %d lines", output_dir, tok.get_vocab_size(), len(lines))
    return output_dir
