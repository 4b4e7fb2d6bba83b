"""Fine-tune 4 tiny BERT classifiers, each with its own learning rate, in one Trainer run."""

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from modelbatch import ModelBatch
from modelbatch.integrations.huggingface import BundledTrainer

torch.manual_seed(0)
config = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, num_labels=2, attn_implementation="eager",
)  # fmt: skip
batch = ModelBatch([BertForSequenceClassification(config) for _ in range(4)])


def example() -> dict:
    ids = torch.randint(0, 100, (16,))
    return {"input_ids": ids, "labels": int(ids[0] < 50)}  # learn: is the first token < 50?


train, val = [example() for _ in range(256)], [example() for _ in range(64)]
args = TrainingArguments("bundle", num_train_epochs=3, per_device_train_batch_size=32,
                         report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
trainer = BundledTrainer(
    model=batch, args=args, train_dataset=train, eval_dataset=val,
    per_model_hparams={"lr": [1e-4, 3e-4, 1e-3, 3e-3]},  # one learning rate per model
)  # fmt: skip
trainer.train()
metrics = trainer.evaluate()  # eval_accuracy/model_0 ... /model_3, eval_loss/model_0 ..., eval_loss
best = max(range(4), key=lambda i: metrics[f"eval_accuracy/model_{i}"])
print(f"best: model {best}, accuracy {metrics[f'eval_accuracy/model_{best}']:.2f}")
trainer.save_model()  # bundle/model.safetensors (all models) and bundle/model_<id>/ per model
