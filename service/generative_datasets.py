"""Generative tasks with exact answers, each with a format of its own, written by rule from a seed.

They are what a stream of generative tasks looks like to the service and to ``bench/cl_generative``:
an instruction, and the one answer wanted, which a rule computes, so exact match is a fair judge.

- ``reverse-words``: the words of a short phrase in reverse order;
- ``iso-date``: a date written out in English, in ISO 8601 (``2021-03-05``);
- ``sort-numbers``: a few numbers, sorted ascending, comma-separated;
- ``unit-conversion``: kilometres, kilograms or litres in metres, grams or millilitres (a number);
- ``person-json``: a sentence about a person as a JSON object of a fixed shape.

Every random choice comes from ``random.Random(seed)`` per task: the same seed, the same records.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import date, timedelta

from service.generative import Pair


def _words(text: str) -> list[str]:
    return text.split()


WORDS = _words(
    "apple river stone cloud garden window silver market candle forest harbor violin pepper ladder "
    "meadow rocket castle pillow thunder basket mirror planet orange saddle canyon lantern feather "
    "island marble pencil rabbit summer tunnel velvet wagon yellow anchor blanket cactus dolphin "
    "engine falcon glacier hammer jacket kettle lemon magnet needle oyster puzzle quartz ribbon "
    "shadow tiger umbrella valley walnut zebra bridge copper desert"
)
NAMES = _words(
    "Alice Bruno Chloe Daniel Elena Farid Greta Hugo Ines Jonas Keiko Liam Maya Nadia Oscar Priya "
    "Quentin Rosa Samir Tara Umar Vera Wei Ximena Yusuf Zoe"
)
CITIES = _words("Lisbon Oslo Nairobi Lima Hanoi Dublin Quito Tunis Riga Perth Accra Bogota")
MONTHS = _words("January February March April May June July August September October November December")
UNITS = (("kilometres", "metres"), ("kilograms", "grams"), ("litres", "millilitres"))


def _reverse_words(rng: random.Random) -> Pair:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Pair(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


def _iso_date(rng: random.Random) -> Pair:
    day = date(1990, 1, 1) + timedelta(days=rng.randrange(365 * 40))
    return Pair(
        f"Write this date in ISO format: {MONTHS[day.month - 1]} {day.day}, {day.year}", day.isoformat()
    )


def _sort_numbers(rng: random.Random) -> Pair:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    shown = ", ".join(str(n) for n in numbers)
    return Pair(
        f"Sort these numbers from smallest to largest: {shown}", ", ".join(str(n) for n in sorted(numbers))
    )


def _unit_conversion(rng: random.Random) -> Pair:
    big, small = rng.choice(UNITS)
    tenths = rng.randint(1, 999)
    amount = f"{tenths // 10}.{tenths % 10}" if tenths % 10 else str(tenths // 10)
    return Pair(f"How many {small} are {amount} {big}? Answer with the number only.", str(tenths * 100))


def _person_json(rng: random.Random) -> Pair:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return Pair(
        f"Give this person as JSON with keys name, age and city: {name} is {age} and lives in {city}.", answer
    )


#: Every task: its name and the rule that writes one of its records.
GENERATIVE_TASKS: dict[str, Callable[[random.Random], Pair]] = {
    "reverse-words": _reverse_words,
    "iso-date": _iso_date,
    "sort-numbers": _sort_numbers,
    "unit-conversion": _unit_conversion,
    "person-json": _person_json,
}


def generative_tasks(
    train: int, evaluate: int, seed: int = 0, tasks: list[str] | None = None
) -> dict[str, tuple[list[Pair], list[Pair]]]:
    """Per task (all, or ``tasks`` in that order): ``train`` training and ``evaluate`` eval pairs,
    no prompt in both."""
    made: dict[str, tuple[list[Pair], list[Pair]]] = {}
    names = list(GENERATIVE_TASKS)
    for name in tasks or names:
        if name not in GENERATIVE_TASKS:
            raise ValueError(f"unknown generative task {name!r}; there are {', '.join(names)}")
        # A task's records do not depend on which other tasks are written, nor in what order.
        rng = random.Random(seed * 1_000 + names.index(name))
        write = GENERATIVE_TASKS[name]
        seen: set[str] = set()
        pairs: list[Pair] = []
        attempts = 0
        while len(pairs) < train + evaluate:
            attempts += 1
            if attempts > 100 * (train + evaluate):
                raise ValueError(f"{name}: cannot write {train + evaluate} distinct prompts")
            pair = write(rng)
            if pair.prompt not in seen:
                seen.add(pair.prompt)
                pairs.append(pair)
        made[name] = (pairs[:train], pairs[train:])
    return made
