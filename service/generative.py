"""Per-task LoRA adapters on a causal language model: how generative tasks learn, answer and are judged.

A generative task's records are (prompt, response) pairs. Each task trains a LoRA adapter of its own
on the attention and MLP projections of the frozen language model (``service.language_model``), so a
task never moves another's weights nor the model's own. A pair is laid out as the model's chat
template lays out a user turn and the assistant's answer; the loss is on the answer's tokens only
(the prompt is context), end-of-turn token included, so an adapter also learns where to stop.

A task is judged on its eval pairs by exact match of its greedy answers after normalisation (case,
runs of whitespace, a trailing full stop) and by the mean per-token loss of the wanted answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The projections an adapter trains: attention and MLP (Llama's names; SmolLM2 is a Llama).
LANGUAGE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Label of a token the loss ignores (the prompt's, and padding).
IGNORED = -100


@dataclass(frozen=True)
class Pair:
    """One generative example: the prompt, and the response wanted."""

    prompt: str
    response: str


@dataclass(frozen=True)
class GenerativeEvaluation:
    """A task's eval pairs answered: exact match, mean per-token loss, and the answers themselves."""

    exact_match: float | None
    token_loss: float | None
    answers: list[str]


def normalised(answer: str) -> str:
    """An answer as exact match compares it: case-folded, whitespace runs as one space, no trailing
    full stop (``Paris.`` and ``paris`` match; ``[1, 2]`` and ``[1,2]`` do not)."""
    return " ".join(answer.split()).casefold().removesuffix(".").strip()


class StepTerm(Protocol):
    """A term a training step adds to its loss (``service.generative_regularisers``)."""

    def prepare(
        self, adapters: GenerativeAdapters, adapter: str, ids: torch.Tensor, mask: torch.Tensor
    ) -> Any:
        """What the term needs from outside the step's own forward (run before it)."""

    def loss(
        self,
        adapters: GenerativeAdapters,
        adapter: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        prepared: Any,
    ) -> torch.Tensor | None:
        """The term (None: nothing this step)."""


class GenerativeAdapters:
    """A frozen causal LM with one LoRA adapter per generative task, trained and answered by name."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        lora: LoraConfig,
        learning_rate: float,
        max_prompt_tokens: int,
        max_response_tokens: int,
    ) -> None:
        """``lora``: the shape of every adapter (its ``target_modules`` default to attention and MLP)."""
        if lora.target_modules is None:
            lora.target_modules = list(LANGUAGE_LORA_TARGETS)
        lora.task_type = "CAUSAL_LM"
        self.base = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.learning_rate = learning_rate
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._peft: PeftModel | None = None
        self._optimisers: dict[str, torch.optim.AdamW] = {}
        self._end_of_turn = self._turn_end()

    # --- adapters -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The tasks with an adapter loaded."""
        return [] if self._peft is None else sorted(self._peft.peft_config)

    def add(self, task: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """A fresh adapter for ``task`` (one that changes nothing yet), or the saved ``weights``."""
        if task in self.names():
            raise ValueError(f"adapter {task!r} already exists")
        if self._peft is None:
            self._peft = get_peft_model(self.base, self.lora, adapter_name=task)
        else:
            self._peft.add_adapter(task, self.lora)
        if weights is not None:
            set_peft_model_state_dict(self._peft, weights, adapter_name=task)
        self._peft.eval()

    def remove(self, task: str) -> None:
        """Unload ``task``'s adapter (and forget its optimiser)."""
        self._optimisers.pop(task, None)
        if self._peft is not None and task in self._peft.peft_config:
            self._peft.delete_adapter(task)

    def weights(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s adapter tensors, ready for safetensors."""
        assert self._peft is not None
        state = get_peft_model_state_dict(self._peft, adapter_name=task)
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    # --- layout -------------------------------------------------------------------------------------

    def _turn_end(self) -> str:
        """What the chat template writes after an assistant's answer (the end-of-turn mark)."""
        if self.tokenizer.chat_template is None:
            return self.tokenizer.eos_token or ""
        with_answer = self._template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
        )
        after = with_answer[with_answer.rindex("!") + 1 :]
        return after.rstrip("\n") or (self.tokenizer.eos_token or "")

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` is on its own (what the limits on prompts and responses count)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the model reads it before answering (a user turn, then the assistant's cue),
        cut to its last ``max_prompt_tokens`` tokens."""
        if self.tokenizer.chat_template is None:
            text = prompt + "\n"
        else:
            text = self._template([{"role": "user", "content": prompt}], generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids[-self.max_prompt_tokens :]

    def response_ids(self, response: str) -> list[int]:
        """A wanted answer's tokens, end-of-turn mark included, at most ``max_response_tokens``."""
        ids = list(self.tokenizer(response + self._end_of_turn, add_special_tokens=False)["input_ids"])
        return ids[: self.max_response_tokens]

    def batch(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and labels of ``pairs``, right-padded; labels only on answers."""
        rows = [(self.prompt_ids(p.prompt), self.response_ids(p.response)) for p in pairs]
        width = max(len(prompt) + len(response) for prompt, response in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORED, dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            ids[i, :n] = torch.tensor(prompt + response)
            mask[i, :n] = 1
            labels[i, len(prompt) : n] = torch.tensor(response)
        return ids, mask, labels

    # --- learning -----------------------------------------------------------------------------------

    @contextmanager
    def using(self, task: str | None) -> Iterator[PreTrainedModel | PeftModel]:
        """The model with ``task``'s adapter active (None: the language model alone)."""
        if task is None:
            with self._peft.disable_adapter() if self._peft is not None else nullcontext():
                yield self._peft if self._peft is not None else self.base
            return
        assert self._peft is not None, f"no adapter {task!r}"
        if self._peft.active_adapter != task:  # setting it walks every module: not once per token
            self._peft.set_adapter(task)
        yield self._peft

    def step(self, task: str, pairs: Sequence[Pair], regularisers: Sequence[StepTerm] = ()) -> float:
        """One optimiser step of ``task``'s adapter on ``pairs``, plus each of ``regularisers``' terms;
        the batch's mean answer-token loss."""
        ids, mask, labels = self.batch(pairs)
        # Before the step's own forward: they may run another adapter (LwF's teacher, the model alone).
        prepared = [regulariser.prepare(self, task, ids, mask) for regulariser in regularisers]
        with self.using(task) as model:
            model.train()
            try:
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                loss = out.loss
                for regulariser, ready in zip(regularisers, prepared, strict=True):
                    extra = regulariser.loss(self, task, out.logits, labels, ready)
                    loss = loss if extra is None else loss + extra
                optimiser = self._optimiser(task)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            finally:
                model.eval()
        return float(out.loss.detach())

    def parameters(self, task: str) -> dict[str, torch.nn.Parameter]:
        """``task``'s trainable LoRA weights by name."""
        assert self._peft is not None, f"no adapter {task!r}"
        return {n: p for n, p in self._peft.named_parameters() if f".{task}." in n and "lora_" in n}

    def _optimiser(self, task: str) -> torch.optim.AdamW:
        optimiser = self._optimisers.get(task)
        if optimiser is None:
            trainable = list(self.parameters(task).values())
            optimiser = self._optimisers[task] = torch.optim.AdamW(trainable, lr=self.learning_rate)
        return optimiser

    # --- answering and judging ----------------------------------------------------------------------

    @torch.no_grad()
    def token_losses(self, task: str | None, pairs: Sequence[Pair]) -> list[float]:
        """Per pair, the mean loss of the wanted answer's tokens under ``task``'s adapter (None: the
        language model alone)."""
        ids, mask, labels = self.batch(pairs)
        with self.using(task) as model:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORED, reduction="none"
        )
        counts = (targets != IGNORED).sum(dim=1).clamp(min=1)
        return (losses.sum(dim=1) / counts).tolist()

    @torch.no_grad()
    def text_loss(self, task: str | None, text: str, most_tokens: int = 512) -> float:
        """The mean per-token loss of plain ``text`` (no chat template; its first ``most_tokens``
        tokens) under ``task``'s adapter (None: the language model alone)."""
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"][:most_tokens]])
        with self.using(task) as model:
            return float(model(input_ids=ids, labels=ids).loss)

    def generate(self, task: str | None, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to ``prompts`` under ``task``'s adapter (None: the language model alone),
        each cut at its end-of-turn mark."""
        return [answer for answer, _ in self.generate_counted(task, prompts, max_new_tokens)]

    @torch.no_grad()
    def generate_counted(
        self, task: str | None, prompts: Sequence[str], max_new_tokens: int
    ) -> list[tuple[str, int]]:
        """``generate``'s answers, each with how many tokens were generated for it (its end of turn
        included)."""
        rows = [self.prompt_ids(prompt) for prompt in prompts]
        width = max(len(row) for row in rows)
        pad = self.pad_id
        # Left-padded: every row's next token comes at the same position.
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        stop = self.stop_ids()
        with self.using(task) as model:
            # PEFT forwards generate to the model; its stubs do not say so.
            out = cast(Any, model).generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=pad,
            )
        answers = []
        for row in out[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stop), len(row))
            text = str(self.tokenizer.decode(row[:cut], skip_special_tokens=True)).strip()
            answers.append((text, min(cut + 1, len(row))))
        return answers

    @property
    def pad_id(self) -> int:
        """The token prompts are padded with."""
        return int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0

    def decoder(self) -> PreTrainedModel | PeftModel:
        """The model to run forwards on: with the adapters when there are any (rows then name theirs)."""
        return self._peft if self._peft is not None and self.names() else self.base

    def stop_ids(self) -> list[int]:
        ends = self.tokenizer(self._end_of_turn, add_special_tokens=False)["input_ids"][:1]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return sorted(set(ends + eos))

    def evaluate(self, task: str | None, pairs: Sequence[Pair], batch_size: int = 16) -> GenerativeEvaluation:
        """Exact match and mean token loss of ``task`` on its eval ``pairs``."""
        if not pairs:
            return GenerativeEvaluation(None, None, [])
        answers: list[str] = []
        losses: list[float] = []
        longest = max(len(self.response_ids(p.response)) for p in pairs)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            answers += self.generate(task, [p.prompt for p in chunk], max_new_tokens=longest + 2)
            losses += self.token_losses(task, chunk)
        right = sum(normalised(a) == normalised(p.response) for a, p in zip(answers, pairs, strict=True))
        return GenerativeEvaluation(right / len(pairs), sum(losses) / len(losses), answers)
