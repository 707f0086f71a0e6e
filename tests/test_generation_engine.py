"""The generation engine (service.generation_engine) on a tiny Llama: requests for different adapters
and for the language model alone decode in one batch and answer exactly as each would alone; a
request arriving mid-batch joins it and still answers as alone; stop sequences, length, deadlines,
cancellation and a full queue end a request with their reason; an adapter is unloaded only when no
request holds it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.errors import ResourceExhausted
from service.generation_engine import Generation, GenerationEngine, Piece, Sampling
from service.generative import GenerativeAdapters
from service.server_metrics import ServerMetrics
from tests.test_generative import adapters as tiny_adapters

PROMPTS = ["Reverse the words: red green blue", "What is 3 plus 4?", "Sort: 9, 2, 5", "Say hello."]


@pytest.fixture
def model(tiny_language_model_dir: Path) -> GenerativeAdapters:
    """The tiny Llama with two adapters that change its answers (random LoRA B matrices)."""
    learner = tiny_adapters(tiny_language_model_dir)
    generator = torch.Generator().manual_seed(1)
    for name in ("alpha", "beta"):
        learner.add(name)
        for key, parameter in learner.decoder().named_parameters():
            if f"lora_B.{name}." in key:
                with torch.no_grad():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return learner


@pytest.fixture
def engine(model: GenerativeAdapters) -> Iterator[GenerationEngine]:
    running = GenerationEngine(model, ServerMetrics(CollectorRegistry()), max_batch_size=8, queue_size=4)
    running.start()
    yield running
    running.stop()
    running.join(timeout=30)


def text_of(generation: Generation, timeout_s: float = 60) -> tuple[str, Piece]:
    parts = []
    while True:
        piece = generation.pieces.get(timeout=timeout_s)
        parts.append(piece.text)
        if piece.done:
            return "".join(parts), piece


def request(model: GenerativeAdapters, prompt: str, adapter: str | None, **sampling: object) -> Generation:
    return Generation(model.prompt_ids(prompt), adapter, Sampling(**{"max_new_tokens": 12, **sampling}))  # type: ignore[arg-type]


def test_mixed_adapters_decode_together_as_each_would_alone(
    model: GenerativeAdapters, engine: GenerationEngine
) -> None:
    chosen = [(PROMPTS[0], "alpha"), (PROMPTS[1], None), (PROMPTS[2], "beta"), (PROMPTS[3], "alpha")]
    alone = [model.generate(adapter, [prompt], max_new_tokens=12)[0] for prompt, adapter in chosen]
    assert len(set(alone)) > 1  # the adapters do change the answers
    generations = [engine.submit(request(model, p, a)) for p, a in chosen]
    answers = [text_of(g) for g in generations]
    assert [text.strip() for text, _ in answers] == alone
    assert all(piece.reason in ("stop", "length") for _, piece in answers)


def test_a_request_arriving_mid_batch_joins_it_and_answers_as_alone(
    model: GenerativeAdapters, engine: GenerationEngine
) -> None:
    # Measured first: nothing else may run the model while the engine does (PEFT's per-row adapters
    # are forward hooks on the shared modules).
    alone = [model.generate("beta", [PROMPTS[1]], 12)[0], model.generate(None, [PROMPTS[3]], 12)[0]]
    first = engine.submit(request(model, PROMPTS[0], "alpha", max_new_tokens=40))
    first.pieces.get(timeout=60)  # decoding has started
    late = [
        engine.submit(request(model, PROMPTS[1], "beta")),
        engine.submit(request(model, PROMPTS[3], None)),
    ]
    assert not first.finished  # still running when the others arrive
    assert [text_of(g)[0].strip() for g in late] == alone
    rest, _ = text_of(first)
    assert rest.strip()


def test_every_way_a_request_ends_says_why(model: GenerativeAdapters, engine: GenerationEngine) -> None:
    text, piece = text_of(engine.submit(request(model, PROMPTS[0], "alpha", max_new_tokens=5)))
    if piece.reason == "length":
        assert piece.tokens == 5
        # A stop sequence taken from what the model says ends it there, the stop left out.
        stop = text.strip()[-2:]
        cut, stopped = text_of(
            engine.submit(request(model, PROMPTS[0], "alpha", max_new_tokens=5, stop=(stop,)))
        )
        assert stopped.reason == "stop" and stop not in cut and text.startswith(cut)
    gone = request(model, PROMPTS[1], None, max_new_tokens=500)
    engine.submit(gone)
    gone.pieces.get(timeout=60)
    gone.cancelled.set()
    assert text_of(gone)[1].reason in ("cancelled", "stop")
    late = request(model, PROMPTS[2], None)
    late.deadline = time.monotonic() - 1
    assert text_of(engine.submit(late))[1].reason == "deadline"
    sampled = [request(model, PROMPTS[3], "beta", temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    for generation in sampled:
        engine.submit(generation)
    assert text_of(sampled[0])[0] == text_of(sampled[1])[0]  # one seed, one answer


def test_a_full_queue_refuses_at_once(model: GenerativeAdapters) -> None:
    idle = GenerationEngine(model, ServerMetrics(CollectorRegistry()), max_batch_size=8, queue_size=2)
    for _ in range(2):
        idle.submit(request(model, PROMPTS[0], None))  # not started: nothing takes them
    with pytest.raises(ResourceExhausted, match="queue is full"):
        idle.submit(request(model, PROMPTS[0], None))


def test_an_adapter_is_unloaded_only_once_no_request_holds_it(
    model: GenerativeAdapters, engine: GenerationEngine
) -> None:
    held = engine.submit(request(model, PROMPTS[0], "beta", max_new_tokens=30))
    held.pieces.get(timeout=60)
    engine.retire("beta")
    time.sleep(0.3)
    assert "beta" in model.names() or held.finished
    text_of(held)
    deadline = time.monotonic() + 10
    while "beta" in model.names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "beta" not in model.names()
    engine.between_steps(lambda: model.add("gamma"))
    assert "gamma" in model.names()
