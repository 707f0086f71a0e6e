"""Per-task LoRA on a causal language model (service.generative): a tiny Llama learns two tasks, each
in its own adapter, without moving the other or the model; the generative tasks written by rule and
the general probe; the real SmolLM2 converted from its GGUF file answers as it should."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from service.errors import CorruptVersion
from service.general_probe import answered_right, measure
from service.generative import IGNORED, GenerativeAdapters, Pair, normalised
from service.generative_datasets import GENERATIVE_TASKS, generative_tasks
from service.language_model import HASHES_FILE, load_language_model

PROMPTS = [f"Say something about item {i}." for i in range(8)]


def adapters(folder: Path) -> GenerativeAdapters:
    model, tokenizer = load_language_model(folder)
    torch.manual_seed(0)
    return GenerativeAdapters(
        model,
        tokenizer,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0),
        learning_rate=1e-2,
        max_prompt_tokens=64,
        max_response_tokens=16,
    )


def test_exact_match_forgives_case_spacing_and_a_full_stop_only() -> None:
    assert normalised("  The capital is  Paris. ") == normalised("the capital is paris")
    assert normalised("[1, 2]") != normalised("[1,2]")
    assert normalised("2024-01-05") != normalised("2024-1-5")


def test_the_loss_is_on_the_answer_and_its_end_of_turn_only(tiny_language_model_dir: Path) -> None:
    learner = adapters(tiny_language_model_dir)
    pair = Pair("What is 2 + 2?", "4")
    _, mask, labels = learner.batch([pair, Pair("Hi", "a longer answer")])
    prompt, response = learner.prompt_ids(pair.prompt), learner.response_ids(pair.response)
    assert labels[0, : len(prompt)].eq(IGNORED).all()
    assert labels[0, len(prompt) : len(prompt) + len(response)].tolist() == response
    assert labels[0, len(prompt) + len(response) :].eq(IGNORED).all()  # padding
    assert mask[0].sum() == len(prompt) + len(response)
    # The chat template's user turn and assistant cue; the answer ends with the end-of-turn mark.
    assert "<|im_start|>assistant" in learner.tokenizer.decode(prompt)
    assert learner.tokenizer.decode(response).endswith("<|im_end|>")


def test_each_task_learns_in_its_own_adapter_and_moves_nothing_else(tiny_language_model_dir: Path) -> None:
    learner = adapters(tiny_language_model_dir)
    alpha = [Pair(p, "alpha") for p in PROMPTS]
    omega = [Pair(p, "omega omega") for p in PROMPTS]
    base_losses = learner.token_losses(None, alpha)
    learner.add("alpha")
    assert learner.evaluate("alpha", alpha).exact_match == 0.0
    for _ in range(40):
        learner.step("alpha", alpha)
    learned = learner.evaluate("alpha", alpha)
    assert learned.exact_match == 1.0, learned.answers
    alpha_weights = learner.weights("alpha")

    learner.add("omega")
    for _ in range(40):
        learner.step("omega", omega)
    assert learner.evaluate("omega", omega).exact_match == 1.0
    # The same prompts, other answers per adapter; the first adapter and the model did not move.
    assert learner.evaluate("alpha", alpha).answers == learned.answers
    assert all(torch.equal(v, learner.weights("alpha")[k]) for k, v in alpha_weights.items())
    assert learner.token_losses(None, alpha) == pytest.approx(base_losses, abs=1e-6)
    assert learner.evaluate("alpha", alpha).token_loss < learner.evaluate(None, alpha).token_loss

    # Its saved weights answer the same in another process's model.
    other = adapters(tiny_language_model_dir)
    other.add("alpha", alpha_weights)
    assert other.evaluate("alpha", alpha).answers == learned.answers


def test_a_converted_folder_that_differs_from_its_hashes_is_refused(
    tiny_language_model_dir: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny_language_model_dir, tmp_path / "model")
    hashes = {p.name: "0" * 64 for p in folder.iterdir()}
    (folder / HASHES_FILE).write_text(json.dumps(hashes))
    with pytest.raises(CorruptVersion, match="differs from its sha256"):
        load_language_model(folder)


@pytest.mark.slow
def test_the_packaged_smollm2_converted_from_gguf_answers_as_it_should(language_model_dir: Path) -> None:
    learner = adapters(language_model_dir)
    assert sum(p.numel() for p in learner.base.parameters()) == pytest.approx(134.5e6, rel=0.01)
    (answer,) = learner.generate(None, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer
    # The general probe's reference figures for the base model (README: 0.58, perplexity 21.3).
    probe = measure(learner, None)
    assert probe.accuracy > 0.5 and probe.perplexity < 30, probe


def test_generative_tasks_are_written_by_rule_the_same_for_a_seed() -> None:
    tasks = generative_tasks(train=40, evaluate=10, seed=3)
    assert list(tasks) == list(GENERATIVE_TASKS)
    assert generative_tasks(train=40, evaluate=10, seed=3) == tasks
    # A task's records do not depend on the other tasks written with it.
    assert generative_tasks(40, 10, seed=3, tasks=["iso-date"])["iso-date"] == tasks["iso-date"]
    assert generative_tasks(40, 10, seed=4)["iso-date"] != tasks["iso-date"]
    for train, held_out in tasks.values():
        assert len(train) == 40 and len(held_out) == 10
        assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    for pair in tasks["reverse-words"][0]:
        assert pair.response.split() == pair.prompt.split(": ")[1].split()[::-1]
    for pair in tasks["sort-numbers"][0]:
        shown = [int(n) for n in pair.prompt.split(": ")[1].split(", ")]
        assert pair.response == ", ".join(str(n) for n in sorted(shown))
    for pair in tasks["iso-date"][0]:
        written = datetime.strptime(pair.prompt.split(": ")[1], "%B %d, %Y")
        assert pair.response == written.date().isoformat()
    for pair in tasks["person-json"][0]:
        person = json.loads(pair.response)
        assert (
            list(person) == ["name", "age", "city"] and f"{person['name']} is {person['age']}" in pair.prompt
        )
    with pytest.raises(ValueError, match="unknown generative task"):
        generative_tasks(1, 1, tasks=["poetry"])


def test_a_probe_answer_is_right_when_an_accepted_answer_is_in_it_as_words() -> None:
    assert answered_right("The capital of France is Paris.", ("Paris",))
    assert answered_right("seven days", ("7", "seven"))
    assert not answered_right("Parisian food", ("Paris",))
    assert not answered_right("17", ("7", "seven"))


def test_the_general_probe_measures_a_model_with_and_without_an_adapter(
    tiny_language_model_dir: Path,
) -> None:
    learner = adapters(tiny_language_model_dir)
    base = measure(learner, None)
    assert 0.0 <= base.accuracy <= 1.0 and 1.0 < base.perplexity < float("inf")
    learner.add("task")
    assert measure(learner, "task") == base  # a fresh adapter changes nothing
    for _ in range(5):
        learner.step("task", [Pair(p, "alpha") for p in PROMPTS])
    assert measure(learner, "task").perplexity != base.perplexity
    assert measure(learner, None) == base
