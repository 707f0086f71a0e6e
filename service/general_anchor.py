"""Keeping what the language model could do: its own answers to general instructions, learned beside
every generative task.

A task's adapter trained only on the task's narrow format drifts on everything else: asked a general
question through that adapter, the model answers in the task's format or worse (the "alignment tax";
``service.general_probe`` measures it). The remedy here is self-distillation: the language model
alone answers a fixed set of general instructions once (greedy, its own words), and each training
batch of a task carries a few of those pairs, so the adapter learns its task while keeping the
model's behaviour on general requests where it was. Nothing outside the model is needed.

The instructions are the project's own and share none of the probe's questions. The last
``HELD_OUT`` of them are never trained on: how closely an adapter still gives the model's own answers
to them (``agreement``) is the figure settings are chosen by, so the probe stays a test.
"""

from __future__ import annotations

from collections.abc import Callable

from service.generative import GenerativeAdapters, Pair, normalised

#: General instructions written for this project (none of them is a probe question).
INSTRUCTIONS: tuple[str, ...] = (
    "Give me one tip for sleeping better.",
    "What is a synonym for happy?",
    "Name three fruits that are red.",
    "Explain in one sentence what a noun is.",
    "Write a short greeting for a birthday card.",
    "What does a thermometer measure?",
    "Why do leaves change colour in autumn? Answer briefly.",
    "Suggest a name for a small grey cat.",
    "What is the plural of mouse?",
    "How do you say thank you in French?",
    "What is the past tense of run?",
    "Name a musical instrument with strings.",
    "What is photosynthesis? Answer in one sentence.",
    "Give an example of a mammal that lives in the sea.",
    "What do you call a baby dog?",
    "Write one sentence about the ocean.",
    "What is the main ingredient of guacamole?",
    "Which season comes after spring?",
    "What is 9 plus 8?",
    "What is half of 50?",
    "Tell me a fun fact about octopuses.",
    "What is the capital of Australia?",
    "Who painted the Mona Lisa?",
    "What does a librarian do?",
    "Describe a rainbow in one sentence.",
    "What is the opposite of early?",
    "Name two kinds of transport that travel on water.",
    "What tool do you use to cut paper?",
    "Why should we drink water every day? Answer briefly.",
    "What is a haiku?",
    "Give me a word that rhymes with cat.",
    "What is the largest desert in the world?",
    "How many hours are in a day?",
    "What is the currency of Japan?",
    "Write a polite way to decline an invitation.",
    "What is the difference between weather and climate? Answer briefly.",
    "What do caterpillars turn into?",
    "Name a vegetable that is orange.",
    "What is the square root of 81?",
    "How can I make a cup of tea?",
    "What does DNA stand for?",
    "What is the main job of the lungs?",
    "Which metal is liquid at room temperature?",
    "Suggest a healthy breakfast.",
    "What is a verb? Give an example.",
    "Who was the first person to walk on the Moon?",
    "What is the longest river in Africa?",
    "Summarise the story of Cinderella in one sentence.",
    "What is the opposite of generous?",
    "Give one reason to recycle plastic.",
    "What is 12 divided by 4?",
    "What do you call a shape with six sides?",
    "Name a famous composer of classical music.",
    "How many players are on a football team on the field?",
    "What is the smallest prime number?",
    "Why is the sea salty? Answer briefly.",
    "Write a short sentence using the word library.",
    "What animal is known for its long neck?",
    "What is the hottest planet in the solar system?",
    "Explain what a volcano is in one sentence.",
    "What is the chemical symbol for gold?",
    "Name a country in South America.",
    "What do you call someone who fixes teeth?",
    "How many minutes are in an hour?",
)
#: The last instructions, never trained on: the adapters' agreement with the model on them is measured.
HELD_OUT = 16
#: An answer of the language model this long (in tokens) or longer was cut: not the model's own.
MAX_ANSWER_TOKENS = 96


def own_answers(
    adapters: GenerativeAdapters,
    instructions: tuple[str, ...] | list[str],
    between: Callable[[], None] = lambda: None,
) -> list[Pair]:
    """The language model's own greedy answers to ``instructions`` (no adapter), as pairs; answers
    it had not finished within ``MAX_ANSWER_TOKENS`` are left out (a cut answer would teach stopping
    mid-sentence). ``between`` runs between chunks (half a minute in all for SmolLM2 on 2 cores)."""
    pairs = []
    for start in range(0, len(instructions), 16):
        between()
        chunk = list(instructions[start : start + 16])
        answers = adapters.generate(None, chunk, max_new_tokens=MAX_ANSWER_TOKENS)
        for instruction, answer in zip(chunk, answers, strict=True):
            most = min(MAX_ANSWER_TOKENS, adapters.max_response_tokens)
            if answer and len(adapters.response_ids(answer)) < most:
                pairs.append(Pair(instruction, answer))
    return pairs


def anchors(
    adapters: GenerativeAdapters, between: Callable[[], None] = lambda: None
) -> tuple[list[Pair], list[Pair]]:
    """The pairs learned beside every task, and the held-out ones ``agreement`` is measured on."""
    pairs = own_answers(adapters, INSTRUCTIONS, between)
    held_out = set(INSTRUCTIONS[-HELD_OUT:])
    return [p for p in pairs if p.prompt not in held_out], [p for p in pairs if p.prompt in held_out]


def agreement(adapters: GenerativeAdapters, task: str | None, held_out: list[Pair]) -> float:
    """Share of ``held_out`` instructions ``task``'s adapter still answers with the model's own words."""
    if not held_out:
        return 1.0
    answers = adapters.generate(task, [p.prompt for p in held_out], max_new_tokens=MAX_ANSWER_TOKENS)
    same = sum(normalised(a) == normalised(p.response) for a, p in zip(answers, held_out, strict=True))
    return same / len(held_out)
