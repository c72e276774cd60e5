"""OpenFlamingo's OK-VQA answer stemmer (open_flamingo/eval/ok_vqa_utils.py, ``OKVQAStemmer``).

OK-VQA's GT answers are stemmed in the dataset (OK-VQA v1.1), so OpenFlamingo stems the *prediction* to
match: tokenise with nltk ``word_tokenize``, POS-tag with ``pos_tag``, then per token, in this order:

1. a key of the manual table below (exact, case-sensitive) is replaced by its value;
2. else a token ending in ``ing`` becomes WordNet's verb lemma (``WordNetLemmatizer().lemmatize(t, "v")``);
3. else a token tagged ``NNS*``/``NNPS*`` becomes ``inflection.singularize(t)``;

and the tokens are joined with single spaces. The tokenizer splits ``'s`` off before the table is looked
up, so the table's keys with an apostrophe never match (kept: that is what the original does).

Speed, with the same strings as stemming each answer from scratch (benchmarks/okvqa_stemmer.py, and the
tests against the fixture's tokens and tags): every distinct string is stemmed once (model answers repeat a
lot); POS tags are cached per token sequence and lemmas per word; and a string of plain ASCII words
separated by spaces, with none of the tokenizer's contraction patterns (``cannot``, ``gonna``, ...), is
split on spaces instead of running Punkt and the Treebank tokenizer, which give exactly that split for
such a string (no punctuation, quote or sentence boundary for their rules to act on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lavis.metrics.nltk_data import MissingNltkDataError, ensure_nltk_data


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


# OpenFlamingo's ``_MANUAL_MATCHES`` (168 entries), in its order: words the automatic rules miss or get
# wrong on OK-VQA's raw answers (e.g. "christmas", which inflection would singularise).
MANUAL_MATCHES = _pairs(
    """
    police=police las=las vegas=vegas yes=yes jeans=jean hell's=hell domino's=domino morning=morn
    clothes=cloth are=are riding=ride leaves=leaf dangerous=danger clothing=cloth texting=text kiting=kite
    firefighters=firefight ties=tie married=married teething=teeth gloves=glove tennis=tennis dining=dine
    directions=direct waves=wave christmas=christmas drives=drive pudding=pud coding=code plating=plate
    quantas=quanta hornes=horn graves=grave mating=mate paned=pane alertness=alert sunbathing=sunbath
    tenning=ten wetness=wet urinating=urine sickness=sick braves=brave firefighting=firefight lenses=lens
    reflections=reflect backpackers=backpack eatting=eat designers=design curiousity=curious
    playfulness=play blindness=blind hawke=hawk tomatoe=tomato rodeoing=rodeo brightness=bright
    circuses=circus skateboarders=skateboard staring=stare electronics=electron electicity=elect
    mountainous=mountain socializing=social hamburgers=hamburg caves=cave transitions=transit wading=wade
    creame=cream toileting=toilet sautee=saute buildings=build belongings=belong stockings=stock walle=wall
    cumulis=cumuli travelers=travel conducter=conduct browsing=brows pooping=poop haircutting=haircut
    toppings=top hearding=heard sunblocker=sunblock bases=base markings=mark mopeds=mope
    kindergartener=kindergarten pies=pie scrapbooking=scrapbook couponing=coupon meetings=meet
    elevators=elev lowes=low men's=men childrens=children shelves=shelve paintings=paint raines=rain
    paring=pare expressions=express routes=rout pease=peas vastness=vast awning=awn boy's=boy
    drunkenness=drunken teasing=teas conferences=confer ripeness=ripe suspenders=suspend earnings=earn
    reporters=report kid's=kid containers=contain corgie=corgi porche=porch microwaves=microwave
    batter's=batter sadness=sad apartments=apart oxygenize=oxygen striping=stripe purring=pure
    professionals=profession piping=pipe farmer's=farmer potatoe=potato emirates=emir womens=women
    veteran's=veteran wilderness=wilder propellers=propel alpes=alp charioteering=chariot swining=swine
    illness=ill crepte=crept adhesives=adhesive regent's=regent decorations=decor rabbies=rabbi
    overseas=oversea travellers=travel casings=case smugness=smug doves=dove nationals=nation
    mustange=mustang ringe=ring gondoliere=gondolier vacationing=vacate reminders=remind baldness=bald
    settings=set glaced=glace coniferous=conifer revelations=revel personals=person daughter's=daughter
    badness=bad projections=project polarizing=polar vandalizers=vandal minerals=miner protesters=protest
    controllers=control weddings=wed sometimes=sometime earing=ear
    """
)


class OKVQAStemmer:
    """Stems predicted answers exactly as OpenFlamingo's OK-VQA evaluation does (see the module docstring)."""

    def __init__(self):
        try:
            import inflection
            import nltk
        except ImportError as err:
            raise MissingNltkDataError(
                f"the OK-VQA stemmer needs the packages nltk and inflection ({err}): pip install nltk inflection"
            ) from None
        ensure_nltk_data()
        self._tokenize = nltk.tokenize.word_tokenize
        self._contractions = _contraction_patterns()
        self._pos_tag = nltk.pos_tag
        self._lemmatize = nltk.stem.WordNetLemmatizer().lemmatize
        self._singularize = inflection.singularize
        self._stems: dict[str, str] = {}
        self._verb_lemmas: dict[str, str] = {}
        self._singulars: dict[str, str] = {}
        self._tags: dict[tuple[str, ...], list[tuple[str, str]]] = {}

    def _token(self, word: str, tag: str) -> str:
        if word in MANUAL_MATCHES:
            return MANUAL_MATCHES[word]
        if word.endswith("ing"):
            lemma = self._verb_lemmas.get(word)
            if lemma is None:
                lemma = self._verb_lemmas[word] = self._lemmatize(word, "v")
            return lemma
        if tag.startswith("NNS") or tag.startswith("NNPS"):
            singular = self._singulars.get(word)
            if singular is None:
                singular = self._singulars[word] = self._singularize(word)
            return singular
        return word

    def tokens(self, text: str) -> list[str]:
        """nltk's ``word_tokenize(text)`` (split on spaces when that is provably the same, see the module)."""
        if self._contractions is not None and _PLAIN_WORDS.fullmatch(text):
            padded = f" {text} "
            if not any(p.search(padded) for p in self._contractions):
                return text.split()
        return self._tokenize(text)

    def tagged(self, text: str) -> list[tuple[str, str]]:
        """nltk's tokens of ``text`` with their POS tags (what the rules look at)."""
        tokens = tuple(self.tokens(text))
        tags = self._tags.get(tokens)
        if tags is None:
            tags = self._tags[tokens] = [tuple(t) for t in self._pos_tag(list(tokens))]
        return tags

    def stem(self, text: str) -> str:
        """The stemmed form of one answer."""
        out = self._stems.get(text)
        if out is None:
            out = self._stems[text] = " ".join(self._token(w, t) for w, t in self.tagged(text))
        return out

    def stem_many(self, texts: Iterable[str]) -> list[str]:
        """``[stem(t) for t in texts]``, each distinct string stemmed once."""
        return [self.stem(text) for text in texts]


_PLAIN_WORDS = re.compile(r" *[A-Za-z]+(?: +[A-Za-z]+)* *")


def _contraction_patterns():
    """The word tokenizer's contraction regexes (``cannot`` -> ``can not``), or None if this nltk has none."""
    try:
        from nltk.tokenize.destructive import NLTKWordTokenizer
    except ImportError:
        return None
    patterns = list(getattr(NLTKWordTokenizer, "CONTRACTIONS2", [])) + list(
        getattr(NLTKWordTokenizer, "CONTRACTIONS3", [])
    )
    return patterns or None


_STEMMER: OKVQAStemmer | None = None


def get_stemmer() -> OKVQAStemmer:
    """The process-wide stemmer (the nltk models load once)."""
    global _STEMMER
    if _STEMMER is None:
        _STEMMER = OKVQAStemmer()
    return _STEMMER
