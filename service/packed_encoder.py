"""A BERT encoder's forward over a batch's real tokens only: no compute spent on padding.

A padded batch costs every text the longest text's length: in a server's batch of 32 CLINC150-like
texts (3 to 25 tokens) more than half the rows a padded forward multiplies are padding. Here every
token-wise layer (the projections, the feed-forward, the layer norms: nearly all of the compute) runs
on the batch's real tokens stacked into one ``(tokens, hidden)`` matrix, and only attention, which
mixes the tokens of one text, sees them padded back into ``(texts, longest, hidden)`` with padded keys
masked. It also calls far fewer modules than the Hugging Face forward, so a lone text costs less too.

The layers are the encoder's own modules (so a ``service.lora_bank.BankedLinear`` in place of one of
its linear layers applies there as it would in a padded forward, told the layout by ``Packing``), and
the answers equal the padded forward's to float rounding (``tests/test_lora_bank.py`` runs both).
Models of another architecture, or a BERT variant this does not reproduce, keep the padded forward
(``packs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def packs(encoder: nn.Module) -> bool:
    """Whether ``packed_outputs`` reproduces this encoder's forward: a BERT encoder (absolute
    positions, not a decoder)."""
    config = getattr(encoder, "config", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
    )


@dataclass(frozen=True)
class Packing:
    """Where a padded batch's real tokens are: ``places`` indexes them in the batch flattened to
    ``(texts * width)``, in order, so a text's tokens are consecutive rows of the packed matrix;
    ``mask`` is the tokenizer's attention mask (True: a real token)."""

    texts: int
    width: int
    places: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The packing of a tokenizer's padded batch (its attention mask)."""
        texts, width = attention_mask.shape
        places = attention_mask.reshape(-1).nonzero().squeeze(1)
        return cls(texts, width, places, attention_mask.sum(1), attention_mask.bool())

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``(tokens, d)`` → ``(texts, width, d)``, zeros where a text is shorter."""
        padded = packed.new_zeros(self.texts * self.width, packed.shape[-1])
        padded[self.places] = packed
        return padded.view(self.texts, self.width, -1)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``(texts, width, d)`` → ``(tokens, d)``: the real tokens' rows."""
        return padded.reshape(self.texts * self.width, -1)[self.places]

    def mean(self, packed: torch.Tensor) -> torch.Tensor:
        """Each text's mean token row ``(texts, d)`` (sentence-transformers' mean pooling)."""
        rows = torch.arange(self.texts).repeat_interleave(self.lengths)
        sums = packed.new_zeros(self.texts, packed.shape[-1]).index_add_(0, rows, packed)
        return sums / self.lengths.clamp(min=1).unsqueeze(1).to(packed.dtype)


def packed_outputs(
    encoder: Any, input_ids: torch.Tensor, packing: Packing, layers: int
) -> list[torch.Tensor]:
    """The mean-pooled outputs ``(texts, hidden)`` of the encoder's last ``layers`` hidden states
    (the embeddings' output counts as the first, as in ``output_hidden_states``), deepest last.
    ``encoder`` is a Hugging Face ``BertModel`` (``packs``); its submodules are read by their names."""
    embeddings = encoder.embeddings
    tokens = input_ids.reshape(-1)[packing.places]
    positions = torch.arange(packing.width).repeat(packing.texts)[packing.places]
    # In the Hugging Face order of additions, so the sums round alike.
    x = embeddings.word_embeddings(tokens) + embeddings.token_type_embeddings(torch.zeros_like(tokens))
    x = embeddings.LayerNorm(x + embeddings.position_embeddings(positions))
    blocks = list(encoder.encoder.layer)
    pooled = [packing.mean(x)] if layers > len(blocks) else []
    keys = packing.mask.view(packing.texts, 1, 1, packing.width)  # no text attends to padding
    for depth, block in enumerate(blocks, start=1):
        x = _layer(block, x, packing, keys)
        if depth > len(blocks) - layers:
            pooled.append(packing.mean(x))
    return pooled


def _layer(block: Any, x: torch.Tensor, packing: Packing, keys: torch.Tensor) -> torch.Tensor:
    """One ``BertLayer`` on packed tokens: its own modules, attention over each text's tokens."""
    attention = block.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def split(projected: torch.Tensor) -> torch.Tensor:  # (texts, heads, width, size)
        return packing.pad(projected).view(packing.texts, packing.width, heads, size).transpose(1, 2)

    mixed = F.scaled_dot_product_attention(
        split(attention.query(x)), split(attention.key(x)), split(attention.value(x)),
        attn_mask=keys, scale=attention.scaling,
    )  # fmt: skip
    mixed = packing.unpad(mixed.transpose(1, 2).reshape(packing.texts, packing.width, heads * size))
    x = block.attention.output(mixed, x)
    return block.output(block.intermediate(x), x)
