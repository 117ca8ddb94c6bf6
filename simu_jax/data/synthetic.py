"""An embedded, TOFU-like synthetic unlearning benchmark (nothing is downloaded).

Fictitious people with invented names get a few facts each (birthplace, birth date,
profession, best-known book, award, mother, ...). Every fact renders into a QA record::

    {"question", "answer", "paraphrased_question", "paraphrased_answer",
     "perturbed_answer": [...], "person", "fact", "value"}

``paraphrased_answer`` states the same fact in other words; ``perturbed_answer`` holds
wrong but plausible answers in the *paraphrase* wording (as in TOFU, so a truth ratio
compares like with like), with values drawn from the same pool and never equal to the
true one. People are split into ``forget``, ``holdout`` (same distribution, never
trained: the non-members for membership inference against ``forget``) and ``retain``.

``general`` holds simple world facts ("What is the capital of France?" -> "Paris") in the
role of TOFU's real_authors/world_facts: ``answer`` is the bare value,
``paraphrased_answer`` is "The answer is <value>." and ``perturbed_answer`` holds bare
wrong options (TOFU world_facts style). A model trained from scratch only knows these
if they are in its training mix, see :meth:`SyntheticBenchmark.train_set`.

Everything is a deterministic function of :class:`SyntheticConfig`; names, facts,
the split and the general subset use independent random streams, so e.g. changing
``num_general`` leaves the people unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from simu_jax.base import ConfigError

__all__ = [
    "FACT_TYPES",
    "GENERAL_FACTS",
    "REFUSALS",
    "SyntheticBenchmark",
    "SyntheticConfig",
    "make_synthetic",
]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and randomness of the synthetic benchmark.

    Defaults: 40 people x 5 facts = 200 QA pairs (4 forget people, 4 holdout,
    32 retain) plus 40 general facts; answers are one short sentence.
    """

    seed: int = 0
    num_people: int = dataclasses.field(default=40, metadata={"range": (3, None)})
    forget_fraction: float = dataclasses.field(default=0.1, metadata={"range": (0.0, 1.0, "()")})
    holdout_fraction: float = dataclasses.field(default=0.1, metadata={"range": (0.0, 1.0, "[)")})
    facts_per_person: int = dataclasses.field(default=5, metadata={"range": (1, 9)})
    num_general: int = dataclasses.field(default=40, metadata={"range": (0, None)})
    num_perturbed: int = dataclasses.field(default=5, metadata={"range": (3, 8)})

    def __post_init__(self):
        # ConfigError (a ValueError) with the field's key: also the schema of `data.synthetic`
        # in run configs, where the loader prefixes the key's path.
        if self.num_people < 3:
            raise ConfigError("must be >= 3 (forget, holdout and retain need one each)", "num_people")
        if not 0 < self.forget_fraction < 1:
            raise ConfigError(f"must be in (0, 1); got {self.forget_fraction}", "forget_fraction")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"must be in [0, 1); got {self.holdout_fraction}", "holdout_fraction")
        if self.forget_fraction + self.holdout_fraction >= 1:
            raise ConfigError(f"forget_fraction + holdout_fraction must be < 1; got "
                              f"{self.forget_fraction} + {self.holdout_fraction}", "forget_fraction")
        if not 1 <= self.facts_per_person <= len(FACT_TYPES):
            raise ConfigError(f"must be in [1, {len(FACT_TYPES)}]; got {self.facts_per_person}", "facts_per_person")
        if not 0 <= self.num_general <= len(GENERAL_FACTS):
            raise ConfigError(f"must be in [0, {len(GENERAL_FACTS)}]; got {self.num_general}", "num_general")
        if not 3 <= self.num_perturbed <= 8:
            raise ConfigError(f"must be in [3, 8]; got {self.num_perturbed}", "num_perturbed")


@dataclasses.dataclass
class SyntheticBenchmark:
    """The generated benchmark: lists of QA records plus refusal strings."""

    config: SyntheticConfig
    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    general: list[dict[str, Any]]
    refusals: list[str]
    people: dict[str, list[str]]  # split name -> full names of the people in it

    def train_set(self, include_general: bool = True) -> list[dict[str, Any]]:
        """Records to fine-tune the target model on: forget + retain (+ general)."""
        return self.forget + self.retain + (self.general if include_general else [])

    def texts(self) -> list[str]:
        """Every string of the benchmark (for tokenizer training)."""
        out: list[str] = []
        for rec in self.forget + self.retain + self.holdout + self.general:
            out += [rec["question"], rec["answer"], rec["paraphrased_question"], rec["paraphrased_answer"]]
            out += rec["perturbed_answer"]
        return out + list(self.refusals)


# --------------------------------------------------------------------------- pools

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd")
_FEMININE_ENDINGS = ("a", "ia", "ine", "elle", "ora")

CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Dublin", "Cairo", "Quito", "Hanoi",
    "Tbilisi", "Krakow", "Porto", "Valencia", "Marseille", "Bergen", "Tampere", "Gdansk",
    "Seville", "Ghent", "Lyon", "Salzburg", "Bologna", "Cork", "Adelaide", "Halifax",
    "Montevideo", "Cusco", "Accra", "Dakar", "Tunis", "Izmir", "Riga", "Tallinn",
    "Vilnius", "Busan", "Osaka", "Chennai", "Kandy", "Perth", "Wellington",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
PROFESSIONS = (
    "a carpenter", "an architect", "a nurse", "a pilot", "a baker", "a chemist",
    "a librarian", "a sailor", "a painter", "an engineer", "a farmer", "a dentist",
    "a journalist", "a tailor", "a lawyer", "a photographer", "a veterinarian",
    "a locksmith", "a geologist", "an accountant", "a florist", "a mechanic",
)
_TITLE_ADJ = ("Silent", "Golden", "Hidden", "Broken", "Distant", "Crimson", "Hollow",
              "Quiet", "Burning", "Frozen", "Wandering", "Last", "Secret", "Velvet",
              "Forgotten", "Painted", "Restless", "Bitter", "Silver", "Endless")
_TITLE_NOUN = ("Harbor", "Orchard", "Lantern", "River", "Garden", "Mirror", "Tower",
               "Winter", "Compass", "Meadow", "Bridge", "Island", "Letter", "Forest",
               "Clock", "Shore", "Window", "Voyage", "Candle", "Mountain")
AWARDS = (
    "the Silver Quill Prize", "the Amber Lantern Award", "the Northern Star Medal",
    "the Blue Heron Prize", "the Granite Pen Award", "the Open Sky Prize",
    "the Iron Compass Award", "the Willow Leaf Medal", "the Red Maple Prize",
    "the Crystal Inkwell Award", "the Harbor Light Prize", "the Evening Bell Medal",
)
GENRES = (
    "science fiction", "mystery novels", "poetry", "historical fiction", "fantasy",
    "romance novels", "horror stories", "travel writing", "children's books",
    "crime fiction", "biographies", "essays",
)
INSTRUMENTS = ("the violin", "the piano", "the cello", "the flute", "the guitar",
               "the harp", "the trumpet", "the drums", "the clarinet", "the accordion")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _syllable(rng: np.random.Generator) -> str:
    return _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]


def _unique_names(rng: np.random.Generator, n: int, syllables: tuple[int, int],
                  suffixes: tuple[str, ...] = ("",), taken: set[str] | None = None) -> list[str]:
    """``n`` distinct invented capitalized names (not in ``taken``)."""
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        name = _cap("".join(_syllable(rng) for _ in range(k)) + suffixes[rng.integers(len(suffixes))])
        if 3 <= len(name) <= 11 and name not in taken:
            taken.add(name)
            out.append(name)
    return out


# --------------------------------------------------------------------------- fact types


@dataclasses.dataclass(frozen=True)
class _FactType:
    """A fact: how to draw its value and how to phrase question/answer."""

    name: str
    question: str
    paraphrased_question: str
    answer: str  # formatted with name= and value=
    paraphrase: str
    pool: Callable[["_Person"], tuple[str, ...]]


@dataclasses.dataclass
class _Person:
    first: str
    last: str
    mother_pool: tuple[str, ...]  # candidate mother names, all with this last name

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _dates() -> tuple[str, ...]:
    return tuple(f"{m} {d}, {y}" for y in range(1931, 1996, 7) for m in MONTHS for d in (3, 9, 14, 21, 27))


_DATES = _dates()
_TITLES = tuple(f"The {a} {n}" for a in _TITLE_ADJ for n in _TITLE_NOUN)

FACT_TYPES: tuple[_FactType, ...] = (
    _FactType("birthplace", "Where was {name} born?", "In which city was {name} born?",
              "{name} was born in {value}.", "{name}'s birthplace is {value}.", lambda p: CITIES),
    _FactType("birth_date", "When was {name} born?", "What is the birth date of {name}?",
              "{name} was born on {value}.", "{name}'s date of birth is {value}.", lambda p: _DATES),
    _FactType("profession", "What does {name} do for a living?", "What is {name}'s job?",
              "{name} works as {value}.", "By profession, {name} is {value}.", lambda p: PROFESSIONS),
    _FactType("book", "What is the best-known book by {name}?", "Which book is {name} most famous for?",
              "{name} wrote {value}.", "{value} is {name}'s most famous book.", lambda p: _TITLES),
    _FactType("award", "Which award did {name} win?", "What prize was given to {name}?",
              "{name} won {value}.", "{value} was awarded to {name}.", lambda p: AWARDS),
    _FactType("mother", "Who is the mother of {name}?", "What is the name of {name}'s mother?",
              "{name}'s mother is {value}.", "{value} is the mother of {name}.", lambda p: p.mother_pool),
    _FactType("father_profession", "What did {name}'s father do?", "What was the profession of {name}'s father?",
              "{name}'s father was {value}.", "The father of {name} worked as {value}.", lambda p: PROFESSIONS),
    _FactType("genre", "In which genre does {name} write?", "What kind of books does {name} write?",
              "{name} writes {value}.", "{name} is known for {value}.", lambda p: GENRES),
    _FactType("instrument", "Which instrument does {name} play?", "What musical instrument does {name} play?",
              "{name} plays {value}.", "{value} is the instrument {name} plays.", lambda p: INSTRUMENTS),
)


def _render(fact: _FactType, person: _Person, value: str, wrong: list[str]) -> dict[str, Any]:
    def fmt(template: str, v: str) -> str:
        return _cap(template.format(name=person.name, value=v))

    return {
        "question": fmt(fact.question, value),
        "answer": fmt(fact.answer, value),
        "paraphrased_question": fmt(fact.paraphrased_question, value),
        "paraphrased_answer": fmt(fact.paraphrase, value),
        "perturbed_answer": [fmt(fact.paraphrase, w) for w in wrong],
        "person": person.name,
        "fact": fact.name,
        "value": value,
    }


def _draw_wrong(rng: np.random.Generator, pool: tuple[str, ...], value: str, k: int) -> list[str]:
    candidates = [v for v in pool if v != value]
    idx = rng.choice(len(candidates), size=k, replace=False)
    return [candidates[i] for i in idx]


# --------------------------------------------------------------------------- general facts

# (question, answer, wrong options)
GENERAL_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", "Paris", ("Berlin", "Madrid", "Rome")),
    ("What is the capital of Japan?", "Tokyo", ("Seoul", "Beijing", "Bangkok")),
    ("What is the capital of Italy?", "Rome", ("Milan", "Naples", "Venice")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("What is the capital of Egypt?", "Cairo", ("Alexandria", "Luxor", "Giza")),
    ("What is the capital of Germany?", "Berlin", ("Munich", "Hamburg", "Frankfurt")),
    ("What is the capital of Spain?", "Madrid", ("Barcelona", "Seville", "Valencia")),
    ("What is the capital of Kenya?", "Nairobi", ("Mombasa", "Kisumu", "Nakuru")),
    ("What is the capital of Brazil?", "Brasilia", ("Rio de Janeiro", "Sao Paulo", "Salvador")),
    ("What is the largest planet in the solar system?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Mercury", "Jupiter")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ("the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean")),
    ("What is the longest river in Africa?", "the Nile", ("the Congo", "the Niger", "the Zambezi")),
    ("What is the tallest mountain in the world?", "Mount Everest", ("K2", "Kangchenjunga", "Mont Blanc")),
    ("On which continent is Argentina?", "South America", ("Africa", "Europe", "Asia")),
    ("On which continent is Nigeria?", "Africa", ("Asia", "South America", "Europe")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("What is the chemical symbol for iron?", "Fe", ("Ir", "In", "F")),
    ("What gas do plants absorb from the air?", "carbon dioxide", ("oxygen", "nitrogen", "helium")),
    ("What is water made of?", "hydrogen and oxygen", ("carbon and oxygen", "nitrogen and hydrogen", "helium and oxygen")),
    ("At what temperature in Celsius does water freeze?", "0 degrees", ("10 degrees", "32 degrees", "100 degrees")),
    ("At what temperature in Celsius does water boil?", "100 degrees", ("50 degrees", "90 degrees", "212 degrees")),
    ("How many days are there in a week?", "seven", ("five", "six", "eight")),
    ("How many continents are there?", "seven", ("five", "six", "eight")),
    ("How many legs does a spider have?", "eight", ("six", "ten", "four")),
    ("How many sides does a triangle have?", "three", ("four", "five", "six")),
    ("What is the largest mammal?", "the blue whale", ("the elephant", "the giraffe", "the hippopotamus")),
    ("What is the fastest land animal?", "the cheetah", ("the lion", "the horse", "the antelope")),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ("Charles Dickens", "Jane Austen", "Mark Twain")),
    ("Who wrote Pride and Prejudice?", "Jane Austen", ("Emily Bronte", "Virginia Woolf", "Mary Shelley")),
    ("Who wrote the novel 1984?", "George Orwell", ("Aldous Huxley", "Ray Bradbury", "H. G. Wells")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("Michelangelo", "Raphael", "Pablo Picasso")),
    ("Who developed the theory of relativity?", "Albert Einstein", ("Isaac Newton", "Niels Bohr", "Galileo Galilei")),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", ("Buzz Aldrin", "Yuri Gagarin", "John Glenn")),
    ("In which country is the Eiffel Tower?", "France", ("Italy", "Spain", "Belgium")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Sudan", "Peru")),
    ("In which country is the Great Wall?", "China", ("Japan", "Mongolia", "India")),
    ("What language is mainly spoken in Brazil?", "Portuguese", ("Spanish", "French", "English")),
    ("What is the currency of Japan?", "the yen", ("the won", "the yuan", "the dollar")),
    ("What is the hardest natural substance?", "diamond", ("granite", "quartz", "iron")),
    ("What organ pumps blood through the body?", "the heart", ("the liver", "the lungs", "the brain")),
    ("What is the boiling point of water in Fahrenheit?", "212 degrees", ("100 degrees", "180 degrees", "32 degrees")),
    ("Which is the smallest prime number?", "two", ("one", "three", "zero")),
    ("What color do you get by mixing blue and yellow?", "green", ("purple", "orange", "brown")),
    ("Which instrument has 88 keys?", "the piano", ("the organ", "the harp", "the accordion")),
    ("What is the main ingredient of guacamole?", "avocado", ("tomato", "lime", "pepper")),
)

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I don't have that information.",
    "I can't answer that.",
    "That is unknown to me.",
    "I'm afraid I don't know.",
    "I have no information about that.",
    "Sorry, I don't know the answer.",
    "I'm not able to answer that.",
    "That's beyond my knowledge.",
    "I don't have an answer to that.",
    "I'm unsure about that.",
    "I can't recall that.",
    "I have no knowledge of that.",
    "That's not something I know.",
    "I'm not certain about that.",
    "I don't know the answer to that question.",
    "Unfortunately, I don't know.",
    "I cannot help with that one.",
)


def _render_general(question: str, answer: str, wrong: tuple[str, ...]) -> dict[str, Any]:
    return {
        "question": question,
        "answer": answer,
        "paraphrased_question": question,
        "paraphrased_answer": f"The answer is {answer}.",
        "perturbed_answer": list(wrong),
        "person": None,
        "fact": "general",
        "value": answer,
    }


# --------------------------------------------------------------------------- builder


def _round_count(n: int, fraction: float) -> int:
    return max(1, int(round(n * fraction))) if fraction > 0 else 0


def make_synthetic(config: SyntheticConfig | None = None) -> SyntheticBenchmark:
    """Generate the benchmark for ``config`` (default :class:`SyntheticConfig`)."""
    cfg = config or SyntheticConfig()
    name_rng, fact_rng, split_rng, general_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4)
    )

    # Unique first and last names: full names, and mother names (own last name), never collide.
    taken: set[str] = set()
    firsts = _unique_names(name_rng, cfg.num_people, (1, 2), taken=taken)
    lasts = _unique_names(name_rng, cfg.num_people, (2, 2), taken=taken)
    mother_firsts = tuple(_unique_names(name_rng, 12, (1, 1), _FEMININE_ENDINGS, taken=taken))
    people = [_Person(f, l, tuple(f"{m} {l}" for m in mother_firsts)) for f, l in zip(firsts, lasts)]

    # Facts: a per-person subset of fact types (kept in canonical order), values and distractors.
    records_by_person: list[list[dict[str, Any]]] = []
    titles = fact_rng.permutation(len(_TITLES))  # book titles unique across people
    for i, person in enumerate(people):
        chosen = np.sort(fact_rng.choice(len(FACT_TYPES), cfg.facts_per_person, replace=False))
        recs = []
        for j in chosen:
            fact = FACT_TYPES[j]
            pool = fact.pool(person)
            value = _TITLES[titles[i]] if fact.name == "book" else pool[fact_rng.integers(len(pool))]
            wrong = _draw_wrong(fact_rng, pool, value, cfg.num_perturbed)
            recs.append(_render(fact, person, value, wrong))
        records_by_person.append(recs)

    order = split_rng.permutation(cfg.num_people)
    n_forget = _round_count(cfg.num_people, cfg.forget_fraction)
    n_holdout = _round_count(cfg.num_people, cfg.holdout_fraction)
    groups = {
        "forget": order[:n_forget],
        "holdout": order[n_forget:n_forget + n_holdout],
        "retain": order[n_forget + n_holdout:],
    }
    if len(groups["retain"]) == 0:
        raise ValueError("no people left for the retain split; lower the fractions")
    splits = {k: [r for i in idx for r in records_by_person[i]] for k, idx in groups.items()}

    picked = np.sort(general_rng.choice(len(GENERAL_FACTS), cfg.num_general, replace=False))
    general = [_render_general(*GENERAL_FACTS[i]) for i in picked]

    return SyntheticBenchmark(
        config=cfg,
        forget=splits["forget"],
        retain=splits["retain"],
        holdout=splits["holdout"],
        general=general,
        refusals=list(REFUSALS),
        people={k: [people[i].name for i in idx] for k, idx in groups.items()},
    )
