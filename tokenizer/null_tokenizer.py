"""A tokenizer without a model, for --mock-data and tests: text is whitespace-separated integer ids."""
from megahet.errors import MegahetError
from megahet.tokenizer.base import AbstractTokenizer


class NullTokenizer(AbstractTokenizer):
    """Ids are written as decimal integers separated by whitespace: "5 17 3" <-> [5, 17, 3].

    It has a single special id, `vocab_size - 1`, which serves as eod, eos, bos and pad, so every other id
    in `[0, vocab_size - 1)` is an ordinary token.
    """

    def __init__(self, vocab_size: int):
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
            raise MegahetError(f"NullTokenizer needs an integer vocab_size >= 2, got {vocab_size!r}; "
                               f"pass --vocab-size N with --tokenizer-type NullTokenizer")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise MegahetError("NullTokenizer reads whitespace-separated integers only; "
                               "use --tokenizer-type SentencePieceTokenizer for text") from None
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise MegahetError(f"NullTokenizer id {bad[0]} is outside [0, {self._vocab_size}); "
                               f"raise --vocab-size or fix the input")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def eos(self) -> int:
        return self._vocab_size - 1

    bos = pad = eos  # the one special id (eod is eos, as in the base class)
