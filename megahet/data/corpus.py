"""The built-in corpus: real English found on every Python installation, so training works out of the box.

Documents are the documentation topics of `pydoc_data.topics` (one per topic) followed by the docstrings
of the standard library (one document per module: its module, class and function docstrings in source
order). Sources are read with `ast`, never imported, since importing arbitrary stdlib modules has side
effects. About 2 MB of text; the order is deterministic. `ensure_builtin_corpus` builds, once per cache
directory, the corpus JSONL, a sentencepiece model trained on it and the indexed dataset, under a lock
so concurrent ranks wait for the first one instead of racing. Machines with different Python versions
build different corpora: give multi-node runs a shared MEGAHET_CACHE_DIR or explicit --data-path.
"""
import ast
import dataclasses
import itertools
import json
import logging
import os
import pkgutil
import sys
import sysconfig
import tokenize
from typing import Iterator

from megahet.data.cache import atomic_open, atomic_write_json, file_lock
from megahet.data.indexed_dataset import dataset_exists
from megahet.data.preprocess import preprocess_data
from megahet.errors import MegahetError

logger = logging.getLogger(__name__)

CORPUS_VERSION = 2  # 2: Megatron's index format
SKIPPED_MODULES = {"test", "tests", "idle_test", "__phello__", "antigravity", "this"}
_DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclasses.dataclass(frozen=True)
class BuiltinData:
    """Paths of the built-in corpus artefacts."""

    tokenizer_model: str  # sentencepiece .model
    data_prefix: str  # indexed dataset, without .bin/.idx
    corpus_path: str  # JSONL, one {"text", "source"} object per document


def default_cache_dir() -> str:
    """$MEGAHET_CACHE_DIR, else $XDG_CACHE_HOME/megahet, else ~/.cache/megahet."""
    if os.environ.get("MEGAHET_CACHE_DIR"):
        return os.environ["MEGAHET_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megahet")


def _stdlib_sources(root: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(module name, source path) of every pure-Python stdlib module below `root`, sorted by name."""
    for module in sorted(pkgutil.iter_modules([root]), key=lambda m: m.name):
        if module.name in SKIPPED_MODULES:
            continue
        name = prefix + module.name
        if module.ispkg:
            package = os.path.join(root, module.name)
            if os.path.isfile(os.path.join(package, "__init__.py")):
                yield name, os.path.join(package, "__init__.py")
            yield from _stdlib_sources(package, name + ".")
        elif os.path.isfile(os.path.join(root, module.name + ".py")):
            yield name, os.path.join(root, module.name + ".py")


def _docstrings(node, qualname: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of `node` and the classes/functions inside it, in source order."""
    doc = ast.get_docstring(node)
    if doc and doc.strip():
        yield qualname, doc.strip()
    yield from _definitions(node, qualname)


def _definitions(node, qualname: str) -> Iterator[tuple[str, str]]:
    """Docstrings of definitions in `node`'s body, including those inside if/try/with blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DOC_NODES):
            yield from _docstrings(child, f"{qualname}.{child.name}")
        elif isinstance(child, ast.stmt):
            yield from _definitions(child, qualname)


def module_document(name: str, path: str) -> "str | None":
    """One module's docstrings as text, or None if it has none or cannot be parsed."""
    try:
        with tokenize.open(path) as handle:
            tree = ast.parse(handle.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return None
    sections = [f"{qualname}\n\n{doc}" for qualname, doc in _docstrings(tree, name)]
    return "\n\n".join(sections) if sections else None


def iter_corpus(max_docs: "int | None" = None) -> Iterator[dict]:
    """Corpus documents as {"text", "source"} dicts, in a fixed order (topics first, then modules)."""
    count = 0
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        topics = {}
    documents = ((f"pydoc:{key}", topics[key]) for key in sorted(topics))
    modules = ((f"stdlib:{name}", module_document(name, path))
               for name, path in _stdlib_sources(sysconfig.get_paths()["stdlib"]))
    for source, text in itertools.chain(documents, modules):
        if not text or not text.strip():
            continue
        if max_docs is not None and count >= max_docs:
            return
        count += 1
        yield {"text": text.strip(), "source": source}


def write_corpus(path: str, max_docs: "int | None" = None) -> int:
    """Write the corpus JSONL atomically; returns the number of documents."""
    count = 0
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for document in iter_corpus(max_docs):
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
            count += 1
        if count == 0:
            raise MegahetError("no docstrings found in this Python's standard library sources; "
                               "pass --data-path and --tokenizer-model instead of the built-in corpus")
    return count


def ensure_builtin_corpus(cache_dir: "str | None" = None, vocab_size: int = 8000,
                          max_docs: "int | None" = None) -> BuiltinData:
    """Build (first call) or find (later calls) the built-in corpus, tokenizer and dataset.

    Args:
        cache_dir: default `default_cache_dir()`.
        vocab_size: tokenizer vocabulary.
        max_docs: keep only the first documents (tests use a few to stay fast).
    """
    from megahet.tokenizer import train_sentencepiece  # the tokenizer package is needed only here

    root = os.path.abspath(cache_dir or default_cache_dir())
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    directory = os.path.join(root, f"builtin-v{CORPUS_VERSION}-{version}-{max_docs or 'all'}docs")
    data = BuiltinData(tokenizer_model=os.path.join(directory, f"tokenizer-{vocab_size}.model"),
                       data_prefix=os.path.join(directory, f"data-{vocab_size}"),
                       corpus_path=os.path.join(directory, "corpus.jsonl"))
    manifest = os.path.join(directory, f"built-{vocab_size}.json")
    if os.path.isfile(manifest):
        return data
    os.makedirs(directory, exist_ok=True)
    with file_lock(os.path.join(directory, "build.lock")):
        if os.path.isfile(manifest):  # another rank built it while we waited
            return data
        if not os.path.isfile(data.corpus_path):
            count = write_corpus(data.corpus_path, max_docs)
            logger.info("wrote the built-in corpus %s (%d documents)", data.corpus_path, count)
        train_sentencepiece(data.corpus_path, data.tokenizer_model[:-len(".model")], vocab_size)
        preprocess_data(data.corpus_path, data.data_prefix, "SentencePieceTokenizer", data.tokenizer_model,
                        append_eod=True, log_interval=1 << 30)
        if not dataset_exists(data.data_prefix):
            raise MegahetError(f"building the built-in dataset {data.data_prefix} failed; delete {directory} "
                               f"and retry")
        atomic_write_json(manifest, {"vocab_size": vocab_size, "tokenizer_model": data.tokenizer_model,
                                     "data_prefix": data.data_prefix, "corpus_path": data.corpus_path})
    return data
