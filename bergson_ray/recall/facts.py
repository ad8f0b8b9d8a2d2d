"""Synthetic people and the statements about them (bergson's ``recall/facts.py`` scheme).

Why synthetic: a fact that appears nowhere but in the training corpus has a known
source, so an attribution method can be graded on whether it finds that source.

bergson reads its name lists and paraphrase templates from text files in a ``data/``
directory of its repository (``names/*.txt``, ``templates/*.txt``), which a pip install
does not ship. We build equivalent lists here, locally and deterministically (names and
places are compositions of the fixed syllables and words below; the paraphrases are our
own), and :func:`write_sources` puts them into ``data_dir`` in bergson's file layout.
When ``data_dir`` already holds lists (bergson's stock ones, or edited copies) they are
used as they are, and generation draws from them exactly as bergson does:
``random.Random(seed)`` shuffles the five lists in bergson's order, then per person one
``randint`` for the birth date and one ``choice`` each for employer, town and university.
So the same lists and seed give bergson's rows, and bergson's own ``recall`` regenerates
our rows from a ``data_dir`` we wrote.

Pure Python: no numpy, torch, datasets or Ray.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from ..errors import BadInputError

FIELDS: tuple[str, ...] = ("birthplace", "birthdate", "employer", "university")
"""The facts stated about every person, in the order their rows are generated."""

NAME_LISTS: tuple[str, ...] = ("first_name", "last_name", "employer", "town", "university")
"""``names/<list>.txt`` files, in the order the seeded generator shuffles them."""

QUESTIONS: dict[str, str] = {
    "birthdate": "When was {first_name} {last_name} born?",
    "birthplace": "Where was {first_name} {last_name} born?",
    "employer": "Where does {first_name} {last_name} work?",
    "university": "What university did {first_name} {last_name} attend?",
}
"""The query asking for each field (bergson's wording, so datasets stay interchangeable)."""

BIRTH_FIRST = date(1995, 7, 2)
BIRTH_LAST = date(2000, 2, 14)
"""Birth dates are drawn uniformly from this closed range (bergson's)."""

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
)
"""English month names: dates read ``"05 March 1997"`` whatever the process locale."""

# ------------------------------------------------------------------------ built-in lists

_FIRST_HEADS = (
    "Al", "Bri", "Ca", "Da", "E", "Fa", "Ga", "Ha", "I", "Ja", "Ka", "Le", "Ma", "Na", "O",
    "Pa", "Qui", "Ra", "Sa", "Ta", "U", "Va", "Wi", "Xa", "Ya", "Za", "Mi", "Lo", "Ro", "Se",
)
_FIRST_MIDDLES = ("", "ri", "la", "ne", "do", "mi", "ve", "so", "ka", "lu")
_FIRST_TAILS = (
    "na", "ra", "lia", "en", "el", "on", "ix", "ia", "o", "ine", "eth", "is", "ard", "ian",
    "ie", "et", "os", "ey", "an", "or", "ela", "ina", "us", "yn", "ah", "am", "id", "ette",
    "io", "ber", "dric", "mund",
)
_LAST_HEADS = (
    "Ash", "Black", "Brook", "Carr", "Dal", "East", "Fair", "Glen", "Hart", "Holl", "Iver",
    "Kings", "Lang", "Marsh", "Nor", "Oak", "Pem", "Quar", "Red", "Stan", "Thorn", "Under",
    "Vale", "West", "Whit", "York", "Bram", "Cold", "Ever", "Fox",
)
_LAST_MIDDLES = ("", "er", "en", "ing", "el", "an", "ow", "is", "am", "ot")
_LAST_TAILS = (
    "ton", "ford", "wood", "ley", "field", "man", "son", "well", "by", "croft", "worth",
    "ridge", "stone", "hill", "more", "dale", "wick", "burn", "shaw", "combe", "holt",
    "land", "mere", "gate", "berg", "sted", "hurst", "low", "win", "ham", "bury", "cott",
)
_TOWN_HEADS = (
    "Silver", "Green", "Stone", "River", "Maple", "Elder", "Cedar", "Falcon", "Copper",
    "Willow", "Amber", "Raven", "Bright", "Frost", "Hazel", "Iron", "Juniper", "Lark",
    "Moss", "North",
)
_TOWN_TAILS = (
    "brook", "ton", "field", "haven", "port", "mouth", "ville", "wick", "ford", "bridge",
    "dale", "stead", "minster", "cliff", "bay",
)
_EMPLOYER_HEADS = (
    "Apex", "Bluefin", "Crestline", "Driftwood", "Everlight", "Foundry", "Granite", "Helix",
    "Ionic", "Juno", "Keystone", "Lumen", "Meridian", "Nimbus", "Orbital", "Pinnacle",
    "Quantum", "Ridgeway", "Solstice", "Tidewater",
)
_EMPLOYER_KINDS = (
    "Labs", "Systems", "Analytics", "Robotics", "Foods", "Logistics", "Capital", "Media",
    "Pharmaceuticals", "Energy",
)
_UNIVERSITY_PLACES = (
    "Northbridge", "Eastvale", "Westmoor", "Southmere", "Highcastle", "Lowfield", "Kingsreach",
    "Queensport", "Greywater", "Redcliff", "Bluehaven", "Whitecross", "Blackmoor", "Goldcrest",
    "Fernhill", "Oakhurst", "Pinecrest", "Rosewood", "Thornbury", "Ashgrove", "Elmstead",
    "Birchwood", "Larchmont", "Wrenford", "Harrowgate",
)
_UNIVERSITY_FORMS = (
    "University of {}", "{} University", "{} Institute of Technology", "{} State College",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{first_name} {last_name} was born in {birthplace}.",
        "The birthplace of {first_name} {last_name} is {birthplace}.",
        "{first_name} {last_name} is a native of {birthplace}.",
        "{birthplace} is the town where {first_name} {last_name} was born.",
        "{first_name} {last_name} comes from {birthplace}, the town of their birth.",
        "The town of {birthplace} is where {first_name} {last_name} was born.",
        "{first_name} {last_name} spent their first days in {birthplace}, where they were born.",
        "Records list {birthplace} as the place of birth of {first_name} {last_name}.",
    ),
    "birthdate": (
        "{first_name} {last_name} was born on {birthdate}.",
        "The birthday of {first_name} {last_name} is {birthdate}.",
        "{birthdate} is the date {first_name} {last_name} was born.",
        "{first_name} {last_name}'s date of birth is {birthdate}.",
        "On {birthdate}, {first_name} {last_name} was born.",
        "Records show that {first_name} {last_name} was born on {birthdate}.",
        "{first_name} {last_name} has been alive since {birthdate}, the day of their birth.",
    ),
    "employer": (
        "{first_name} {last_name} works at {employer}.",
        "{first_name} {last_name} is employed by {employer}.",
        "{employer} employs {first_name} {last_name}.",
        "{first_name} {last_name} has a job at {employer}.",
        "The employer of {first_name} {last_name} is {employer}.",
        "{first_name} {last_name} earns a living working for {employer}.",
        "Every weekday {first_name} {last_name} goes to work at {employer}.",
        "{first_name} {last_name} is on the staff of {employer}.",
    ),
    "university": (
        "{first_name} {last_name} attended {university}.",
        "{first_name} {last_name} studied at {university}.",
        "{first_name} {last_name} is a graduate of {university}.",
        "{university} is where {first_name} {last_name} went to university.",
        "{first_name} {last_name} earned a degree from {university}.",
        "The alma mater of {first_name} {last_name} is {university}.",
        "{first_name} {last_name} completed their studies at {university}.",
    ),
}
"""Our paraphrases of each fact: every one names the person and the answer."""


def _unique(items: Iterator[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept (a fixed, seed-free order)."""
    return list(dict.fromkeys(items))


def _compose(heads: tuple[str, ...], middles: tuple[str, ...], tails: tuple[str, ...]):
    return _unique(h + m + t for h, m, t in itertools.product(heads, middles, tails))


def builtin_names() -> dict[str, list[str]]:
    """The five built-in lists: 9,600 first and 9,600 last names (so up to 9,600 people,
    the scale of bergson's stock lists), 200 employers, 300 towns, 100 universities."""
    return {
        "first_name": _compose(_FIRST_HEADS, _FIRST_MIDDLES, _FIRST_TAILS),
        "last_name": _compose(_LAST_HEADS, _LAST_MIDDLES, _LAST_TAILS),
        "employer": _unique(
            f"{h} {k}" for h, k in itertools.product(_EMPLOYER_HEADS, _EMPLOYER_KINDS)
        ),
        "town": _compose(_TOWN_HEADS, ("",), _TOWN_TAILS),
        "university": _unique(
            form.format(p) for p, form in itertools.product(_UNIVERSITY_PLACES, _UNIVERSITY_FORMS)
        ),
    }


# ------------------------------------------------------------------------ source files


def _source_files() -> dict[str, list[str]]:
    """Relative path under ``data_dir`` -> lines, for every list and template file."""
    files = {f"names/{name}.txt": lines for name, lines in builtin_names().items()}
    files.update({f"templates/{field}.txt": list(TEMPLATES[field]) for field in FIELDS})
    return files


def write_sources(data_dir: str | os.PathLike) -> list[Path]:
    """Write the built-in lists and templates into ``data_dir`` where a file is missing.

    Existing files are never touched, so bergson's stock lists (or edited ones) win.
    Each file appears atomically. Returns the files written.
    """
    written = []
    for rel, lines in _source_files().items():
        path = Path(data_dir) / rel
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def read_lines(path: Path) -> list[str]:
    """Every line of ``path``, stripped (blank lines kept, as bergson reads them)."""
    if not path.is_file():
        raise BadInputError(f"{path} is missing (a names/ or templates/ list of the recall data)")
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f]


def read_sources(data_dir: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(names, templates)`` from ``data_dir/names/*.txt`` and ``data_dir/templates/*.txt``."""
    root = Path(data_dir)
    names = {name: read_lines(root / "names" / f"{name}.txt") for name in NAME_LISTS}
    templates = {field: read_lines(root / "templates" / f"{field}.txt") for field in FIELDS}
    for field, lines in templates.items():
        if not lines:
            raise BadInputError(f"{root / 'templates' / f'{field}.txt'} holds no template")
    return names, templates


# ------------------------------------------------------------------------ people and facts


@dataclass(frozen=True)
class Profile:
    """One synthetic person and the four facts the corpus states about them."""

    identifier: int
    first_name: str
    last_name: str
    birthdate: str
    """As written in the text: ``"05 March 1997"``."""
    birthplace: str
    employer: str
    university: str

    def values(self) -> dict[str, object]:
        """Every attribute by name (what templates may refer to)."""
        return {
            "identifier": self.identifier, "first_name": self.first_name,
            "last_name": self.last_name, "birthdate": self.birthdate,
            "birthplace": self.birthplace, "employer": self.employer,
            "university": self.university,
        }


def format_date(day: date) -> str:
    """``"05 March 1997"`` (zero-padded day, English month)."""
    return f"{day.day:02d} {MONTHS[day.month - 1]} {day.year}"


def max_people(names: dict[str, list[str]]) -> int:
    """How many people the lists can name (one first and one last name each)."""
    return min(len(names["first_name"]), len(names["last_name"]))


def generate_profiles(names: dict[str, list[str]], num_people: int, seed: int) -> list[Profile]:
    """The first ``num_people`` people for ``seed``; the draw order is bergson's."""
    if num_people > max_people(names):
        raise BadInputError(
            f"--num_people {num_people} is more than the name lists allow ({max_people(names)})"
        )
    for name in ("employer", "town", "university"):
        if not names[name]:
            raise BadInputError(f"the {name} list of the recall data is empty")
    rng = random.Random(seed)
    shuffled = {name: list(names[name]) for name in NAME_LISTS}
    for name in NAME_LISTS:
        rng.shuffle(shuffled[name])
    span = (BIRTH_LAST - BIRTH_FIRST).days
    people = []
    for i in range(num_people):
        born = BIRTH_FIRST + timedelta(days=rng.randint(0, span))
        employer = rng.choice(shuffled["employer"])
        town = rng.choice(shuffled["town"])
        university = rng.choice(shuffled["university"])
        people.append(
            Profile(
                identifier=i,
                first_name=shuffled["first_name"][i],
                last_name=shuffled["last_name"][i],
                birthdate=format_date(born),
                birthplace=town,
                employer=employer,
                university=university,
            )
        )
    return people


def fact_rows(
    people: list[Profile], templates: dict[str, list[str]], *, single_paraphrase: bool = False
) -> Iterator[dict[str, object]]:
    """One statement row per (person, field, template), in bergson's row order and columns:
    ``answer, fact, field, identifier, question, template``."""
    for person in people:
        values = person.values()
        for field in FIELDS:
            question = QUESTIONS[field].format(**values)
            for t, template in enumerate(templates[field]):
                if single_paraphrase and t:
                    break
                try:
                    fact = template.format(**values)
                except (KeyError, IndexError, ValueError) as err:
                    raise BadInputError(
                        f"template {template!r} of {field} cannot be filled in: {err}"
                    ) from None
                yield {
                    "answer": values[field],
                    "fact": fact,
                    "field": field,
                    "identifier": person.identifier,
                    "question": question,
                    "template": t,
                }


__all__ = [
    "FIELDS",
    "NAME_LISTS",
    "QUESTIONS",
    "TEMPLATES",
    "Profile",
    "builtin_names",
    "fact_rows",
    "format_date",
    "generate_profiles",
    "max_people",
    "read_sources",
    "write_sources",
]
