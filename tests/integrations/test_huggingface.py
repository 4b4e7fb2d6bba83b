"""BundledTrainer: a real ``transformers.Trainer`` training tiny HF models built from configs.

Reference: each model trained alone by a plain torch loop (AdamW with the Trainer's
weight-decay groups, its linear schedule, ``clip_grad_norm_``, gradient accumulation).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from modelbatch import ModelBatch  # noqa: E402
from modelbatch.integrations.huggingface import BundledTrainer, HFTrainerMixin  # noqa: E402
from tests.helpers import assert_close_models  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LRS = [1e-3, 3e-3, 1e-2]
SEQ = 8


def _bert_models(n: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[Any]:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    models = [BertForSequenceClassification(config).to(dtype) for _ in range(n)]
    for m in models:
        # A key bias shifts every attention score of a query equally (softmax ignores it):
        # its gradient is rounding noise, which Adam would blow up into lr-sized steps.
        for layer in m.bert.encoder.layer:
            layer.attention.self.key.bias.requires_grad_(False)
    return models


def _data(n: int = 32, seed: int = 0, vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[SEQ - 1 - i % 3 :] = 0  # a little padding
        ids = torch.randint(0, vocab, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % 3)})
    return rows


def _args(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "weight_decay": 0.1,
        "max_grad_norm": 0.05,
        "train_sampling_strategy": "sequential",
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 3,
        "disable_tqdm": True,
    }
    defaults.update(kwargs)
    return TrainingArguments(str(tmp_path / "out"), **defaults)


def _trainer(tmp_path: Path, models: list[Any], **kwargs: Any) -> BundledTrainer:
    args = _args(tmp_path, **kwargs.pop("args", {}))
    return BundledTrainer(
        model=ModelBatch(models),
        args=args,
        train_dataset=_data(),
        eval_dataset=_data(24, seed=1),
        per_model_hparams={"lr": LRS},
        **kwargs,
    )


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _train_alone(trainer: BundledTrainer, models: list[Any], steps: int) -> list[Any]:
    """What the Trainer does to one model, as a plain loop (sequential batches)."""
    args = trainer.args
    data, bs, ga = _data(), args.per_device_train_batch_size, args.gradient_accumulation_steps
    micro = [_collate(data[i : i + bs]) for i in range(0, len(data), bs)]
    out = []
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        decay = set(trainer.get_decay_parameter_names(m))
        groups = [
            {"params": [p for n, p in m.named_parameters() if n in decay], "weight_decay": 0.1},
            {"params": [p for n, p in m.named_parameters() if n not in decay], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=LRS[i])
        sched = get_linear_schedule_with_warmup(opt, 0, steps)
        k = 0
        for _ in range(steps):
            for _ in range(ga):
                (m(**micro[k % len(micro)]).loss / ga).backward()
                k += 1
            torch.nn.utils.clip_grad_norm_(m.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        out.append(m)
    return out


def test_train_matches_each_model_trained_alone(tmp_path: Path) -> None:
    models = _bert_models()
    trainer = _trainer(tmp_path, models)
    result = trainer.train()
    norms = trainer.last_grad_norms
    assert norms is not None and (norms > 0.05).all()  # clipping was active, per model
    assert_close_models(
        trainer.model_batch.extract_all(), _train_alone(trainer, models, 6), torch.float64
    )
    # Logs: each model's loss, and the mean over models as "loss" / "train_loss".
    first = trainer.state.log_history[0]
    per_model = [first[f"loss/model_{i}"] for i in range(3)]
    assert first["loss"] == pytest.approx(sum(per_model) / 3)
    # Every model's learning rate, not only model 0's (per_model_hparams lr=LRS, decayed).
    lrs = [first[f"learning_rate/model_{i}"] for i in range(3)]
    ratios = [lr / base for lr, base in zip(lrs, LRS, strict=True)]
    assert 0 < ratios[0] <= 1 and ratios == pytest.approx([ratios[0]] * 3)
    assert result.training_loss == pytest.approx(
        sum(result.metrics[f"train_loss/model_{i}"] for i in range(3)) / 3
    )


def test_evaluate_returns_per_model_metrics(tmp_path: Path) -> None:
    def compute_metrics(pred: Any) -> dict[str, float]:
        return {"top1": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    models = _bert_models(seed=3)
    trainer = _trainer(tmp_path, models, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    batch = _collate(_data(24, seed=1))
    for i, model in enumerate(models):
        with torch.no_grad():
            out = model.eval()(**batch)
        acc = float((out.logits.argmax(-1) == batch["labels"]).double().mean())
        assert metrics[f"eval_loss/model_{i}"] == pytest.approx(float(out.loss), rel=1e-12)
        assert metrics[f"eval_accuracy/model_{i}"] == pytest.approx(acc)
        assert metrics[f"eval_top1/model_{i}"] == pytest.approx(acc)
    assert metrics["eval_loss"] == pytest.approx(
        sum(metrics[f"eval_loss/model_{i}"] for i in range(3)) / 3
    )
    assert trainer.model_batch.training  # evaluation restored train mode

    pred = trainer.predict(_data(24, seed=1))
    assert pred.predictions.shape == (3, 24, 3)  # [N, samples, classes]
    for i, model in enumerate(models):
        with torch.no_grad():
            logits = model(**batch).logits.float().numpy()
        assert abs(pred.predictions[i] - logits).max() < 1e-6
        assert pred.metrics[f"test_loss/model_{i}"] == metrics[f"eval_loss/model_{i}"]
    unlabelled = [{k: v for k, v in row.items() if k != "labels"} for row in _data(5)]
    pred = trainer.predict(unlabelled)
    assert pred.label_ids is None and pred.predictions.shape == (3, 5, 3)
    assert not any("loss" in k for k in pred.metrics)


def test_save_model_and_resume_from_checkpoint(tmp_path: Path) -> None:
    models = _bert_models()
    full = _trainer(tmp_path / "full", models)
    full.train()

    first = _trainer(tmp_path / "a", models, args={"save_strategy": "steps", "save_steps": 3})
    first.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file()

    resumed = _trainer(tmp_path / "b", _bert_models(seed=9))  # other initial weights
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_close_models(
        resumed.model_batch.extract_all(), full.model_batch.extract_all(), torch.float64
    )

    out = tmp_path / "saved"
    resumed.save_model(str(out))
    assert json.loads((out / "modelbatch.json").read_text()) == {"model_ids": [0, 1, 2]}
    for i in range(3):
        loaded = BertForSequenceClassification.from_pretrained(out / f"model_{i}")
        assert_close_models([loaded], [resumed.model_batch.extract(i)], torch.float64)


def test_causal_lm_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=SEQ,
        tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    models = [LlamaForCausalLM(config) for _ in range(2)]
    data = [{**row, "labels": row["input_ids"]} for row in _data(8)]
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=1, max_grad_norm=0.0)
    args.weight_decay = 0.0
    trainer = BundledTrainer(
        model=ModelBatch(models), args=args, train_dataset=data, eval_dataset=data,
        per_model_hparams={"lr": [1e-3, 1e-2]},
    )  # fmt: skip
    trainer.train()
    ref = []
    for lr, model in zip([1e-3, 1e-2], models, strict=True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        sched = get_linear_schedule_with_warmup(opt, 0, 2)
        for k in range(2):
            m(**_collate(data[4 * k : 4 * k + 4])).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        ref.append(m)
    assert_close_models(trainer.model_batch.extract_all(), ref, torch.float32)
    assert set(trainer.evaluate()) >= {"eval_loss/model_0", "eval_loss/model_1", "eval_loss"}
    trainer.save_model(str(tmp_path / "lm"))  # tied weights: stored once per name
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "lm" / "model_1")
    assert_close_models([loaded], [trainer.model_batch.extract(1)], torch.float32)


def test_mixin_composes_with_a_custom_trainer(tmp_path: Path) -> None:
    class LoggingTrainer(transformers.Trainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the mix-in's compute_loss must win")

    class MyTrainer(HFTrainerMixin, LoggingTrainer):
        pass

    trainer = MyTrainer(
        model=ModelBatch(_bert_models(2, dtype=torch.float32)),
        args=_args(tmp_path, max_steps=1),
        train_dataset=_data(8),
        loss_fn=torch.nn.functional.cross_entropy,
    )
    trainer.train()
    assert trainer.model_batch.latest_losses is not None
    assert trainer.model_batch.latest_losses.shape == (2,)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    models = _bert_models(2, dtype=torch.float32)
    trainer = BundledTrainer(
        model=ModelBatch(models), args=_args(tmp_path, max_steps=2, bf16=True),
        train_dataset=_data(16),
    )  # fmt: skip
    trainer.train()
    losses = trainer.model_batch.latest_losses
    assert losses is not None and torch.isfinite(losses).all()
    moved = trainer.model_batch.extract(1).classifier.weight
    assert not torch.equal(moved, models[1].classifier.weight)


def test_bad_set_ups_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="trains a ModelBatch"):
        BundledTrainer(model=_bert_models(1)[0], args=_args(tmp_path))
    with pytest.raises(ValueError, match="fp16"):
        BundledTrainer(model=ModelBatch(_bert_models(2)), args=_args(tmp_path, fp16=True))
    trainer = _trainer(tmp_path, _bert_models())
    unlabelled = [{k: v for k, v in row.items() if k != "labels"} for row in _data(8)]
    with pytest.raises(ValueError, match=r"no per-model loss \(expected shape \[3\]"):
        trainer.compute_loss(trainer.model, _collate(unlabelled))


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "modelbatch.integrations.huggingface")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[huggingface\]'"):
        importlib.import_module("modelbatch.integrations.huggingface")


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
def test_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(EXAMPLES / "huggingface_example.py"), run_name="__main__")
    metrics = ns["metrics"]
    assert {f"eval_accuracy/model_{i}" for i in range(4)} <= set(metrics)
    best = ns["best"]
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "bundle" / f"model_{best}")
    assert_close_models([loaded], [ns["batch"].extract(best)], torch.float32)


def test_label_smoothing_is_applied_to_each_model(tmp_path: Path) -> None:
    models = _bert_models(2)
    trainer = _trainer(tmp_path, models, args={"label_smoothing_factor": 0.2})
    inputs = _collate(_data(8))
    trainer.compute_loss(trainer.model, inputs)
    losses = trainer.model_batch.latest_losses
    assert losses is not None
    for i, model in enumerate(models):
        with torch.no_grad():
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        expected = torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=0.2)
        # (the Trainer's LabelSmoother sums the smoothing term in float32)
        assert float(losses[i]) == pytest.approx(float(expected), rel=1e-6)
    assert trainer.args.label_smoothing_factor == 0.2


def test_padded_token_labels_and_preprocess_logits_for_metrics(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import (
        BertForTokenClassification,
        DataCollatorForTokenClassification,
        PreTrainedTokenizerFast,
    )

    vocab = {"[PAD]": 0, "[UNK]": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]", unk_token="[UNK]",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(2, 40, (n,), generator=g), "labels": torch.randint(0, 3, (n,))}
        for n in (3, 5, 4, 7, 2, 6)
    ]  # batches of 4 and 2 padded to lengths 7 and 6 by the collator
    models = [BertForTokenClassification(m.config) for m in _bert_models(2)]
    trainer = BundledTrainer(
        model=ModelBatch(models), args=_args(tmp_path, per_device_eval_batch_size=4),
        data_collator=DataCollatorForTokenClassification(tokenizer),
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
        compute_metrics=lambda p: {
            "tokacc": float((p.predictions == p.label_ids)[p.label_ids != -100].mean())
        },
    )  # fmt: skip
    pred = trainer.predict(rows)
    assert pred.predictions.shape == (2, 6, 7)  # [N, samples, longest]: argmax'd per model
    assert pred.label_ids.shape == (6, 7)
    assert (pred.label_ids[4, 2:] == -100).all()  # padded as the Trainer pads
    for i, model in enumerate(models):
        hits = []
        for row in rows:
            with torch.no_grad():
                logits = model.eval()(input_ids=row["input_ids"][None]).logits[0]
            hits.append(logits.argmax(-1) == row["labels"])
        expected = float(torch.cat(hits).double().mean())
        assert pred.metrics[f"test_tokacc/model_{i}"] == pytest.approx(expected)


def test_unsupported_trainer_features_are_refused(tmp_path: Path) -> None:
    batch = ModelBatch(_bert_models(2))
    checkpointing = (  # transformers 5 renamed the argument
        "activation_checkpointing"
        if hasattr(TrainingArguments, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    with pytest.raises(ValueError, match="gradient_checkpointing is not supported"):
        BundledTrainer(model=batch, args=_args(tmp_path, **{checkpointing: True}))
    with pytest.raises(ValueError, match="include_for_metrics"):
        BundledTrainer(model=batch, args=_args(tmp_path, include_for_metrics=["inputs"]))
    with pytest.raises(TypeError, match="does not take model_init"):
        BundledTrainer(model_init=lambda: batch, args=_args(tmp_path))
    with pytest.raises(ValueError, match="single-model loss_fn"):
        BundledTrainer(model=batch, args=_args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    trainer = BundledTrainer(model=batch, args=_args(tmp_path))
    with pytest.raises(NotImplementedError, match="per_model_hparams"):
        trainer.hyperparameter_search(n_trials=2)
