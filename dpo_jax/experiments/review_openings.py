"""Openings of movie reviews, generated from templates: the prompts of the sentiment experiment.

Each opening names a made-up film and sets up a judgement without making it ("The acting in
Harbor of Glass was", "I went to see The Last Engine with my sister, and"), so that the
continuation, not the opening, carries the sentiment: VADER scores every opening itself at or
near 0 (`tests/test_sentiment.py` checks it). Templates, titles, genres, names, companions and
aspects are drawn independently, so a few hundred openings are nearly all distinct; the train and
held-out sets are drawn with different seeds and the held-out set leaves out any opening the
train set has.
"""

from __future__ import annotations

import numpy as np

_TITLE_FIRST = (
    "Harbor", "Midnight", "Silver", "Northern", "Painted", "Quiet", "Paper", "Hollow", "Distant",
    "Iron", "Winter", "Crimson", "Last", "Second", "Electric", "Velvet", "Glass", "Salt",
    "Copper", "Eastern",
)  # fmt: skip
_TITLE_SECOND = (
    "Engine", "Garden", "Signal", "River", "Orchard", "Station", "Letters", "Kingdom", "Horizon",
    "Lighthouse", "Passage", "Summer", "Machine", "Island", "Frontier", "Choir", "Archive",
    "Motel", "Canyon", "Tide",
)  # fmt: skip
_GENRES = (
    "drama", "satire", "heist film", "sports film", "documentary", "period drama",
    "science fiction film", "western", "musical", "road movie", "courtroom drama",
    "animated film", "mystery", "period piece",
)  # fmt: skip
_FIRST_NAMES = (
    "Maria", "James", "Aiko", "Daniel", "Priya", "Tom", "Elena", "Samuel", "Ruth", "Omar",
    "Lena", "Victor", "Nora", "Hugo", "Ingrid", "Rafael",
)  # fmt: skip
_LAST_NAMES = (
    "Alvarez", "Brooks", "Chen", "Duval", "Eriksen", "Fischer", "Garcia", "Hart", "Ito", "Jensen",
    "Kowalski", "Laurent", "Moreau", "Novak", "Okafor", "Petrov",
)  # fmt: skip
_COMPANIONS = (
    "my sister", "my father", "a colleague", "my roommate", "my kids", "my grandmother",
    "my neighbours", "my husband", "my wife", "nobody",
)  # fmt: skip
_ASPECTS = (
    "acting", "script", "soundtrack", "ending", "camera work", "dialogue", "pacing",
    "lead performance", "plot", "set design", "editing", "final act",
)  # fmt: skip
_TIMES = ("last night", "on Sunday", "this weekend", "yesterday", "on a Tuesday evening")
_TEMPLATES = (
    "I watched {title} {time}, and",
    "The {aspect} in {title} was",
    "{title} is a {genre} directed by {director}. The {aspect}",
    "I went to see {title} with {companion}, and",
    "{actor} has the lead role in {title}, a {genre} that",
    "After two hours of {title}, I",
    "{title}, the new {genre} from {director}, is",
    "My review of {title}: the {aspect} is",
    "I did not know much about {title} before {time}. It turned out",
    "In {title}, {actor} stars as a stranger in a small town. The film",
    "The first thing you notice about {title} is the {aspect}. It",
    "Everyone has been talking about {title}, so I saw it {time}. Overall,",
)


def make_openings(count: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct review openings drawn with `seed`, none of them in `exclude`.

    Raises:
      ValueError: the templates cannot give `count` distinct openings (after 50·count draws).
    """
    rng = np.random.default_rng(seed)
    openings: dict[str, None] = {}  # insertion-ordered set
    for _ in range(50 * count):
        if len(openings) == count:
            break
        opening = _draw(rng)
        if opening not in exclude:
            openings.setdefault(opening)
    if len(openings) < count:
        raise ValueError(f"only {len(openings)} distinct openings for count={count}")
    return list(openings)


def _pick(rng: np.random.Generator, choices: tuple[str, ...]) -> str:
    return choices[int(rng.integers(len(choices)))]


def _name(rng: np.random.Generator) -> str:
    return f"{_pick(rng, _FIRST_NAMES)} {_pick(rng, _LAST_NAMES)}"


def _draw(rng: np.random.Generator) -> str:
    title = f"{_pick(rng, _TITLE_FIRST)} {_pick(rng, _TITLE_SECOND)}"
    if rng.random() < 0.4:
        title = "The " + title
    fields = dict(
        title=title,
        time=_pick(rng, _TIMES),
        aspect=_pick(rng, _ASPECTS),
        genre=_pick(rng, _GENRES),
        director=_name(rng),
        actor=_name(rng),
        companion=_pick(rng, _COMPANIONS),
    )
    return _pick(rng, _TEMPLATES).format(**fields)
