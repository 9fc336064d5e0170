"""Text tokenizer backed by a trained sentencepiece model (the one tools/train_tokenizer.py writes)."""
import os

from megahet.errors import MegahetError
from megahet.tokenizer.base import AbstractTokenizer


class SentencePieceTokenizer(AbstractTokenizer):
    """Encode/decode with a sentencepiece `.model` file.

    Models trained by `train_sentencepiece` use the fixed special ids documented there
    (unk 0, bos 1, eos 2, pad 3); other models work too, with their own ids. A model without a pad id
    uses eos for padding. eod is eos.
    """

    def __init__(self, model_path: str):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise MegahetError(f"tokenizer model {model_path} not found; pass --tokenizer-model "
                               f"or run tools/train_tokenizer.py")
        import sentencepiece

        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as error:
            raise MegahetError(f"tokenizer model {model_path} could not be loaded ({error}); "
                               f"re-create it with tools/train_tokenizer.py") from None
        self._vocab_size = self._sp.GetPieceSize()
        self._bos, self._eos = self._sp.bos_id(), self._sp.eos_id()
        if self._eos < 0:
            raise MegahetError(f"tokenizer model {model_path} has no eos id, which marks document ends; "
                               f"train it with tools/train_tokenizer.py")
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (for debugging and vocabulary export)."""
        return self._sp.IdToPiece(int(token_id))

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def pad(self) -> int:
        return self._pad
