"""Zoo cases from HuggingFace transformers, built from tiny configs (no download): BERT,
DistilBERT, GPT-2 (tied embedding and LM head), BART, T5, ViT, wav2vec2 (weight_norm in
its positional convolution). Dropout probabilities are 0 so that a model trained alone and
in a batch see the same function; HF's default "sdpa" attention is used."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.zoo.cases import Case

CASES: list[Case] = []
SKIPPED: dict[str, str] = {}

try:
    import transformers as tf
except ImportError as e:  # pragma: no cover - installed with the huggingface extra
    SKIPPED["transformers"] = f"transformers is not installed: {e!r}"
    tf = None

B, L, VOCAB = 2, 6, 40


def _ids(g: torch.Generator) -> tuple[Tensor]:
    return (torch.randint(1, VOCAB, (B, L), generator=g),)


def _ids_mask(g: torch.Generator) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -2:] = 0  # one padded sequence
    return ids, mask


def _logits(out: Any) -> Tensor:
    return out.logits


def _hidden(out: Any) -> Tensor:
    return out.last_hidden_state


class _Wrap(nn.Module):
    """Calls a HF model with named inputs (positional order differs between models)."""

    def __init__(self, model: nn.Module, *names: str) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


_TINY = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
_NO_DROP = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

if tf is not None:

    def bert() -> nn.Module:
        cfg = tf.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=16, num_labels=3, **_TINY, **_NO_DROP
        )
        return _Wrap(tf.BertForSequenceClassification(cfg), "input_ids", "attention_mask")

    def bert_checkpointed() -> nn.Module:
        model = bert()
        inner = model.model
        enable = getattr(inner, "activation_checkpointing_enable", None)
        (enable or inner.gradient_checkpointing_enable)()  # HF's activation checkpointing
        return model

    def bert_reentrant() -> nn.Module:
        model = bert()
        inner = model.model
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable({"use_reentrant": True})
        else:  # transformers < 5
            inner.gradient_checkpointing_enable({"use_reentrant": True})
        return model

    def distilbert() -> nn.Module:
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB,
            max_position_embeddings=16,
            dim=16,
            n_layers=2,
            n_heads=2,
            hidden_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
        )
        return _Wrap(tf.DistilBertForMaskedLM(cfg), "input_ids", "attention_mask")

    def gpt2() -> nn.Module:
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_positions=16,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
        )
        return _Wrap(tf.GPT2LMHeadModel(cfg), "input_ids")

    def bart() -> nn.Module:
        cfg = tf.BartConfig(
            vocab_size=VOCAB,
            max_position_embeddings=16,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            use_cache=False,
        )
        return _Wrap(tf.BartForConditionalGeneration(cfg), "input_ids", "attention_mask")

    def t5() -> nn.Module:
        cfg = tf.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
            use_cache=False,
            decoder_start_token_id=0,
        )
        return _Wrap(tf.T5ForConditionalGeneration(cfg), "input_ids", "decoder_input_ids")

    def vit() -> nn.Module:
        cfg = tf.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, num_labels=3, **_TINY, **_NO_DROP
        )
        return _Wrap(tf.ViTForImageClassification(cfg), "pixel_values")

    def wav2vec2() -> nn.Module:
        cfg = tf.Wav2Vec2Config(
            vocab_size=VOCAB,
            **_TINY,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feat_proj_dropout=0.0,
            layerdrop=0.0,
            final_dropout=0.0,
            mask_time_prob=0.0,
            conv_dim=(8, 8),
            conv_stride=(4, 2),
            conv_kernel=(8, 4),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
        )
        return _Wrap(tf.Wav2Vec2ForCTC(cfg), "input_values")

    CASES += [
        # SGD throughout: attention key biases have a true gradient of 0, which Adam would
        # turn from rounding noise into lr-sized steps (in a batch and alone alike).
        Case("hf_bert", bert, _ids_mask, select=_logits),
        Case("hf_bert_activation_checkpointing", bert_checkpointed, _ids_mask, select=_logits),
        Case("hf_bert_reentrant_checkpointing", bert_reentrant, _ids_mask, select=_logits),
        Case("hf_distilbert", distilbert, _ids_mask, select=_logits),
        Case("hf_gpt2_tied_lm_head", gpt2, _ids, select=_logits),
        Case("hf_gpt2_per_model_inputs", gpt2, _ids, select=_logits, per_model=True),
        Case("hf_bart", bart, _ids_mask, select=_logits),
        Case("hf_t5", t5, lambda g: (_ids(g)[0], _ids(g)[0][:, :4]), select=_logits),
        Case(
            "hf_vit",
            vit,
            lambda g: (torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64),),
            select=_logits,
        ),
        Case(
            "hf_wav2vec2_weight_norm",
            wav2vec2,
            lambda g: (torch.randn(B, 200, generator=g, dtype=torch.float64),),
            select=_logits,
        ),
    ]

__all__ = ["CASES", "SKIPPED", "pytest"]
