"""Answer normalisation of the official VQAv2 evaluation (GT-Vision-Lab/VQA vqaEval.py @ a013f00).

Each function reproduces one step of the official code, quirks included, because the published VQAv2
numbers were produced with them (see docs in ``lavis/metrics/vqa.py`` and the conformance fixture):

* ``normalize_whitespace``: ``\\n`` and ``\\t`` become spaces, then ``strip()``.
* ``process_punctuation``: each punctuation mark is deleted or replaced by a space depending on the
  *original* string; then at most 32 periods that are not followed by a digit are deleted (the official
  code passes ``re.UNICODE`` (= 32) as the ``count`` argument of ``re.sub``).
* ``process_digit_article``: lower case, number words to digits, articles dropped, contractions restored.

The official code ran under Python 2, where ``\\d`` in these byte-string patterns matches ASCII digits
only; we therefore match ``[0-9]`` rather than Python 3's Unicode ``\\d``.
"""

from __future__ import annotations

import re

# The official list, in its order; the order matters because the decision for each mark is made on the
# original string but the replacements are applied cumulatively. "'", ":", "%", "#", "&", "$", "*" are not in it.
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# A digit-comma-digit anywhere ("1,000") makes every punctuation mark be deleted rather than spaced.
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
# Official pattern "(?!<=\d)(\.)(?!\d)": the intended look-behind is written as a look-ahead for the
# two characters "<=", which can never follow the position of a ".", so only "(?!\d)" has an effect.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")
# re.UNICODE (= 32) lands in re.sub's ``count`` parameter in the official code.
_MAX_PERIODS_DELETED = 32

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})


def _pairs(text: str) -> dict[str, str]:
    """Parse ``key=value`` pairs separated by whitespace (keeps the long table below readable)."""
    return dict(item.split("=", 1) for item in text.split())


# The official contractions table (apostrophes are ASCII in a013f00). Its keys "Im", "Ive", "Id've" and
# "I'dve" start with a capital I and can never match a lower-cased word, so they are left out: the
# behaviour is identical. "somebody'd" -> "somebodyd" is reversed in the official table and kept so.
CONTRACTIONS = _pairs(
    """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
    mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
    oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
    she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
    shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
    somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
    someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
    somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
    thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
    theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
    twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've
    whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
    """
)


def normalize_whitespace(text: str) -> str:
    """Official first step for GT answers and predictions: ``\\n``/``\\t`` -> space, then ``strip()``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: delete or space out punctuation, then delete up to 32 periods.

    A mark is deleted (rather than replaced by a space) when the original ``text`` has it next to a space
    on either side, or when ``text`` contains a digit-comma-digit anywhere.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark not in out:
            continue
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_DELETED)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case words, number words -> digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of an answer already passed through ``normalize_whitespace``."""
    return process_digit_article(process_punctuation(text))
