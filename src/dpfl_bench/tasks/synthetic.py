"""`synthetic`: a tiny random-init transformer on generated token sequences. For fast tests only.

The label of a sequence is whether it holds more tokens from the lower half of the vocabulary than from
the upper half, so a model can learn it, but nothing here is pretrained or real: never draw conclusions
from this task.
"""

from typing import TYPE_CHECKING

from dpfl_bench.config import SourcesConfig
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit, refuse_sources, register_task
from dpfl_bench.tasks.sentiment import LORA_TARGETS

if TYPE_CHECKING:
    import torch

VOCAB = 64
LENGTH = 12
TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE = 700, 100, 200  # 600 examples left to train on
MODEL_NAME = "synthetic-tiny-bert (random init)"


def _examples(n: int, generator: "torch.Generator") -> Examples:
    import torch

    ids = torch.randint(2, VOCAB, (n, LENGTH), generator=generator)  # 0 and 1 are [PAD] and [CLS]
    ids[:, 0] = 1
    labels = ((ids[:, 1:] < VOCAB // 2).sum(dim=1) > (LENGTH - 1) / 2).long()
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


def load_data(sources: SourcesConfig) -> TrainTestSplit:
    refuse_sources("synthetic", sources)
    import torch

    generator = torch.Generator().manual_seed(4321)
    return TrainTestSplit(train=_examples(TRAIN_SIZE, generator), test=_examples(TEST_SIZE, generator), num_classes=2)


def count_data(sources: SourcesConfig) -> int:
    refuse_sources("synthetic", sources)
    return TRAIN_SIZE


def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
    from transformers import BertConfig, BertModel

    from dpfl_bench.tasks.models import MeanPooledClassifier

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    encoder = BertModel(config, add_pooling_layer=False)
    return BuiltModel(MeanPooledClassifier(encoder, num_classes), MODEL_NAME, LORA_TARGETS, heads=("head",))


register_task(
    Task(
        name="synthetic",
        description="SYNTHETIC: generated token sequences (600 train / 100 validation / 200 test), tiny random-init BERT "
        "(for tests, not conclusions)",
        model_name=MODEL_NAME,
        load_data=load_data,
        count_train=count_data,
        build_model=build_model,
        lora_targets=LORA_TARGETS,
        validation_size=VALIDATION_SIZE,
        defaults={"clients": 3, "participation": 1.0, "rounds": 3, "local-steps": 4, "batch-size": 16, "lr": 1e-2},
        synthetic=True,
    )
)
