"""What the language model could do before any task: a fixed probe, measured for every version.

Fine-tuning for a task can cost the model abilities the task never asked about (the "alignment tax").
So besides its own tasks, every adapter is measured on a general probe the project wrote for it and
ships here: short questions of general knowledge and arithmetic, each with the few answers that count
as right (an answer is right if one of them appears in it as whole words: the base model answers in
sentences), and a paragraph of plain English whose perplexity tells whether the model still reads
ordinary text as before. The probe's own figures for the base model are the reference: forgetting
of the base model's abilities is the drop from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from service.generative import GenerativeAdapters

#: (question, the answers that count as right); written for this project.
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What gas do plants take in from the air to make their food?", ("carbon dioxide", "CO2")),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many months are there in a year?", ("12", "twelve")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 10 minus 3?", ("7", "seven")),
    ("What is 5 times 6?", ("30", "thirty")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are ripe bananas?", ("yellow",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What do bees make?", ("honey",)),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What is the primary language spoken in Mexico?", ("Spanish",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What do you call frozen water?", ("ice",)),
    ("How many sides does a triangle have?", ("3", "three")),
    ("What is the boiling point of water in degrees Celsius at sea level?", ("100", "one hundred")),
)

#: Plain English written for this project: its perplexity is the probe's second figure.
TEXT = (
    "Every morning the baker on the corner opens her shop before the sun comes up. She lights the "
    "ovens, weighs the flour and water, and shapes the loaves that rested through the night. By the "
    "time the first customers arrive, the windows are warm and the shelves are full. Most people buy "
    "the same thing every day: a round loaf of bread, two rolls, sometimes a small cake on a Friday. "
    "The baker knows their names and asks about their children, their gardens and their work. In the "
    "afternoon, when the shop is quiet, she cleans the counters, counts the money and writes down "
    "what she needs to order for the next week. Flour comes from a mill in the valley, butter from a "
    "farm an hour away, and eggs from a neighbour who keeps a few hens behind her house. Running a "
    "small shop is hard work, and the days are long, but she says she would not trade it for any "
    "other job. People come back because the bread is good and because they are always welcome."
)


@dataclass(frozen=True)
class ProbeResult:
    """The general probe's figures for one model (an adapter, or the language model alone)."""

    #: Share of the questions answered right.
    accuracy: float
    #: Perplexity of the paragraph of plain English.
    perplexity: float


def answered_right(answer: str, accepted: tuple[str, ...]) -> bool:
    """Whether one of the ``accepted`` answers appears in ``answer`` as whole words (any case)."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


def measure(adapters: GenerativeAdapters, task: str | None, batch_size: int = 12) -> ProbeResult:
    """The probe's figures under ``task``'s adapter (None: the language model alone)."""
    right = 0
    for start in range(0, len(QUESTIONS), batch_size):
        chunk = QUESTIONS[start : start + batch_size]
        answers = adapters.generate(task, [question for question, _ in chunk], max_new_tokens=24)
        right += sum(answered_right(a, accepted) for a, (_, accepted) in zip(answers, chunk, strict=True))
    return ProbeResult(right / len(QUESTIONS), math.exp(adapters.text_loss(task, TEXT)))
