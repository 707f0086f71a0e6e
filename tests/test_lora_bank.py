"""The server's banked LoRA model against the trainer's PEFT model on a tiny real BERT: the same
answers from the same weights files, through any number of loads and unloads, on any target layers;
weights that do not fit are refused whole; loading never adds modules to the encoder. Both forwards the
server has: on real tokens only (``service.packed_encoder``, BERT's) and padded (any other encoder)."""

from __future__ import annotations

import pytest
import torch

from service.model import BASE_FEATURE_LAYERS, AdapterModel, build_model, lora_spec
from service.served_model import ServedModel, build_served_model
from service.settings import Settings

TEXTS = ["book a table for two", "what is my balance", "play some jazz", "a longer text " * 6]


def randomised(model: AdapterModel, name: str, labels: int, seed: int) -> dict[str, torch.Tensor]:
    """A new adapter with every LoRA and head weight moved off its start (LoRA's B starts at zero)."""
    model.add(name, num_labels=labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.named_parameters(name).values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.weights(name)


def assert_answers_as(served: ServedModel, trained: AdapterModel, names: list[str]) -> None:
    """Every (text, adapter) pair, all in one mixed batch with base rows, equals PEFT one at a time."""
    rows = [(text, name) for name in names for text in TEXTS] + [(text, None) for text in TEXTS]
    texts, adapters = [t for t, _ in rows], [a for _, a in rows]
    answers = served.outputs(texts, adapters)
    for (text, adapter), answer in zip(rows, answers, strict=True):
        expected = (
            trained.predict(adapter, [text])[0]
            if adapter is not None
            else torch.from_numpy(trained.base_embeddings([text], layers=BASE_FEATURE_LAYERS))[0]
        )
        assert torch.allclose(answer, expected, atol=1e-5), (text, adapter, (answer - expected).abs().max())
        if adapter is None:  # base features end with the base embedding
            embedding = torch.from_numpy(trained.base_embeddings([text]))[0]
            assert torch.allclose(answer[-served.hidden_size :], embedding, atol=1e-5)
    # A batch of base rows alone (no adapter row: the bank stays out of the forward).
    alone = served.outputs(TEXTS, [None] * len(TEXTS))
    expected = torch.from_numpy(trained.base_embeddings(TEXTS, layers=BASE_FEATURE_LAYERS))
    assert torch.allclose(torch.stack(alone), expected, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("targets", [["query", "value"], ["query", "key", "value", "dense"]])
def test_the_bank_answers_as_peft_through_loads_unloads_and_growth(
    settings: Settings, targets: list[str], packed: bool
) -> None:
    settings = settings.model_copy(update={"lora_target_modules": targets, "lora_r": 4, "lora_alpha": 12})
    trained = build_model(settings)
    served = ServedModel(settings.base_model_path(), lora_spec(settings), settings.max_length, packed)
    assert build_served_model(settings).packed  # a BERT encoder is packed by default
    weights = {f"t{i}@v1": randomised(trained, f"t{i}@v1", 2 + i % 3, seed=i) for i in range(20)}
    modules = sum(1 for _ in served.encoder.modules())
    for name in list(weights)[:12]:  # past the first 7 slots: the banks grow
        served.load(name, weights[name])
    for name in list(weights)[2:9]:  # freed slots are zeroed and reused
        served.remove(name)
    for name in list(weights)[12:]:
        served.load(name, weights[name])
    loaded = [name for i, name in enumerate(weights) if not 2 <= i < 9]
    assert served.names() == loaded
    assert_answers_as(served, trained, loaded)
    # Loading adds no module: forwards and loads cost the same with one or a thousand adapters.
    assert sum(1 for _ in served.encoder.modules()) == modules


def test_weights_that_do_not_fit_are_refused_whole(settings: Settings) -> None:
    trained, served = build_model(settings), build_served_model(settings)
    good = randomised(trained, "good@v1", 3, seed=1)
    served.load("good@v1", good)
    layer = next(key for key in good if key.endswith("lora_A.weight"))
    broken = {
        "a layer missing": {k: v for k, v in good.items() if k != layer},
        "a wrong shape": {**good, layer: torch.zeros(good[layer].shape[0] + 1, good[layer].shape[1])},
        "a layer this model lacks": {**good, layer.replace("query", "nonexistent"): good[layer]},
        "a head of another width": {**good, "head.weight": torch.zeros(3, 7)},
    }
    messages = {
        "a layer missing": "no LoRA weights for layer",
        "a wrong shape": "this server's layers take",
        "a layer this model lacks": "do not fit the base model",
        "a head of another width": "does not fit outputs",
    }
    for what, weights in broken.items():
        with pytest.raises(ValueError, match=messages[what]):
            served.load(f"broken@v1-{what}", weights)
    assert served.names() == ["good@v1"]
    assert_answers_as(served, trained, ["good@v1"])
    with pytest.raises(ValueError, match="already"):
        served.load("good@v1", good)
