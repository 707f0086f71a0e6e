"""Per-task LoRA on a causal language model (service.generative): a tiny Llama learns two tasks, each
in its own adapter, without moving the other or the model; the real SmolLM2 converted from its GGUF
file answers as it should."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from service.errors import CorruptVersion
from service.generative import IGNORED, GenerativeAdapters, Pair, normalised
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
    _, mask, labels = learner._batch([pair, Pair("Hi", "a longer answer")])
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
