"""Words that name nothing one could point at in an image: articles, pronouns, auxiliaries,
conjunctions, most prepositions. Content words are what the pointing measures look at.

Written out here rather than taken from NLTK or spaCy: neither is a dependency, and this list only
has to cover caption English (Flickr/COCO), where it was checked against the most frequent words."""

STOP_WORDS = frozenset(
    """
        a an the this that these those there here it its it's they them their he him his she her hers we us
        our you your i me my mine who whom whose which what where when while as at by for from in into of
        off on onto out over to up down with without about above across after against along among around
        before behind below beneath beside besides between beyond during inside near outside through toward
        towards under underneath upon within and or but nor so yet if then than because though although is
        are was were be been being am has have had having do does did doing can could will would shall
        should may might must not no very too just also only some any each every all both either neither
        other another such own same few more most s t 's one ones something someone nothing while front top
        next side
        """.split()  # noqa: SIM905 (a word list reads better as text)
)


def is_content_word(word: str) -> bool:
    w = word.lower().strip(".,!?;:'\"()")
    return bool(w) and w.isalpha() and w not in STOP_WORDS
