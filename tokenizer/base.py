"""The interface every tokenizer offers, so data and training code never care which one is used."""
from abc import ABC, abstractmethod


class AbstractTokenizer(ABC):
    """Maps text to token ids and back, and names the special ids the data pipeline needs.

    `eod` is the id appended after every document when data is preprocessed (`--append-eod`) and the one
    `--eod-mask-loss` masks. `vocab_size` is the exact vocabulary; the model's embedding uses
    `padded_vocab_size(...)` on top of it.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids the tokenizer can produce."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode `text` to ids (no bos/eos added)."""

    @abstractmethod
    def detokenize(self, ids) -> str:
        """Decode ids (any int sequence) back to text."""

    @property
    @abstractmethod
    def bos(self) -> int:
        """Beginning-of-sequence id."""

    @property
    @abstractmethod
    def eos(self) -> int:
        """End-of-sequence id."""

    @property
    @abstractmethod
    def pad(self) -> int:
        """Padding id."""

    @property
    def eod(self) -> int:
        """End-of-document id; the eos id unless a tokenizer says otherwise."""
        return self.eos

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
