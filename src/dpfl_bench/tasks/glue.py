"""GLUE `sst2`, `qnli`, `mnli`, `qqp`, `rte`, `mrpc`, `cola`: the paper's language tasks, with RoBERTa.

Text is tokenized once at load (`--workers` processes) with the model's own tokenizer, padded to the
task's maximum length; batches are then cut to their longest sequence. The model is the transformers
sequence-classification model of the checkpoint (for RoBERTa: the <s> token through dense + tanh +
out_proj), so any `--model hf:<id>` with such a head works. Test accuracy is on GLUE's validation split
(GLUE's test labels are not public; MNLI: validation_matched); the validation split a run tunes on is
held out of GLUE's training split instead.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit, register_task
from dpfl_bench.tasks.hub import column_of, from_hub, load_splits, lora_targets_for, parse_model, split_of

if TYPE_CHECKING:
    from torch import nn

HUB_ID = "nyu-mll/glue"
DEFAULT_MODEL = "hf:FacebookAI/roberta-base"


@dataclass(frozen=True)
class GlueTask:
    text: tuple[str, ...]  # one column, or a sentence pair
    num_classes: int
    max_length: int
    validation_size: int  # held out of the training split: 10% of the hub's, at most 2,000
    validation: str = "validation"  # the split evaluated as test


GLUE = {
    "sst2": GlueTask(("sentence",), 2, 64, 2000),  # 67,349 train
    "cola": GlueTask(("sentence",), 2, 64, 855),  # 8,551 train
    "qnli": GlueTask(("question", "sentence"), 2, 128, 2000),  # 104,743 train
    "mnli": GlueTask(("premise", "hypothesis"), 3, 128, 2000, "validation_matched"),  # 392,702 train
    "qqp": GlueTask(("question1", "question2"), 2, 128, 2000),  # 363,846 train
    "rte": GlueTask(("sentence1", "sentence2"), 2, 128, 249),  # 2,490 train
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, 128, 366),  # 3,668 train
}


def model_source(sources: SourcesConfig) -> tuple[str, str]:
    """(name recorded with results, where to load from): --model-path overrides where, not what."""
    kind, name = parse_model(sources.model, DEFAULT_MODEL)
    if kind != "hf":
        raise UserError(
            f"GLUE tasks take transformers models: --model hf:<id-or-path>, e.g. hf:FacebookAI/roberta-large; got {sources.model!r}"
        )
    return name, sources.model_path or name


def _mirror_hint(name: str) -> str:
    folder = name.rpartition("/")[2]
    return (
        f"on a machine with the hub run `python -c \"from transformers import AutoModel as M, AutoTokenizer as T; "
        f"M.from_pretrained('{name}').save_pretrained('{folder}'); T.from_pretrained('{name}').save_pretrained('{folder}')\"`, "
        f"copy the folder here and pass --model-path {folder}"
    )


def load_tokenizer(sources: SourcesConfig) -> object:
    """The model's tokenizer, padding on the right (batches are cut to their longest sequence from the
    right); a tokenizer without a pad token (Llama-like) pads with its end-of-sequence token."""
    from transformers import AutoTokenizer

    name, where = model_source(sources)
    tokenizer = from_hub(f"tokenizer of {name}", lambda: AutoTokenizer.from_pretrained(where), _mirror_hint(name))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {name} has neither a pad nor an end-of-sequence token; GLUE batches need padding")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(split: object, task: GlueTask, tokenizer: object, workers: int) -> Examples:
    columns = [column_of(split, c, ()) for c in task.text]

    def encode(batch: dict) -> dict:
        return tokenizer(*[batch[c] for c in columns], max_length=task.max_length, truncation=True, padding="max_length")

    encoded = split.map(
        encode, batched=True, num_proc=workers or None, keep_in_memory=True, desc="tokenizing",
        remove_columns=[c for c in split.column_names if c != "label"],
    ).with_format("torch")[:]
    features = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    return Examples(features, encoded["label"])


def fresh_heads(model: "nn.Module", heads: tuple[str, ...]) -> None:
    """Re-initialize the head under the run's seed: a checkpoint's classifier of the task's size (already
    fine-tuned, perhaps on this very task) would otherwise be kept by from_pretrained."""
    for name in heads:
        module = model.get_submodule(name)
        for tensor in (*module.parameters(), *module.buffers()):
            tensor._is_hf_initialized = False  # transformers' init functions skip loaded tensors
        module.apply(model._init_weights)


def glue_task(name: str, task: GlueTask) -> Task:
    def load_data(sources: SourcesConfig) -> TrainTestSplit:
        tokenizer = load_tokenizer(sources)  # checks --model before the data are read
        splits = load_splits(HUB_ID, name, sources, "text")
        train = split_of(splits, ("train",), sources.data_dir)
        test = split_of(splits, (task.validation,), sources.data_dir)
        return TrainTestSplit(
            train=tokenize(train, task, tokenizer, sources.workers),
            test=tokenize(test, task, tokenizer, sources.workers),
            num_classes=task.num_classes,
        )

    def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
        from transformers import AutoModelForSequenceClassification

        from dpfl_bench.tasks.models import SequenceClassifier

        model_name, where = model_source(sources)
        model = from_hub(
            f"model {model_name}",
            lambda: AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_classes, ignore_mismatched_sizes=True),
            _mirror_hint(model_name),
        )
        # The head is whatever the task class adds on top of the pretrained base model.
        heads = tuple(n for n, m in model.named_children() if n != model.base_model_prefix and any(True for _ in m.parameters()))
        fresh_heads(model, heads)
        if model.config.pad_token_id is None:  # Llama-like: the tokenizer pads with its end-of-sequence token
            model.config.pad_token_id = load_tokenizer(sources).pad_token_id
        targets = lora_targets_for(model, heads)
        return BuiltModel(SequenceClassifier(model), f"hf:{model_name}", targets, tuple(f"model.{h}" for h in heads))

    pair = " pairs" if len(task.text) == 2 else ""
    return Task(
        name=name,
        description=f"GLUE {name.upper()} ({task.num_classes} classes, sentence{pair}, max length {task.max_length}), "
        f"{task.validation_size:,} training examples held out for validation, RoBERTa-base; hub or --data-dir",
        model_name=DEFAULT_MODEL,
        load_data=load_data,
        build_model=build_model,
        lora_targets=("query", "key", "value", "dense"),
        validation_size=task.validation_size,
        # The paper's language setting: 20 clients, 0.2 sampled each round, rank 8 with alpha = 2r.
        defaults={"clients": 20, "participation": 0.2, "rounds": 50, "local-steps": 20, "batch-size": 32,
                  "rank": 8, "lora-alpha": 16.0, "lr": 1e-3},
    )


for _name, _task in GLUE.items():
    register_task(glue_task(_name, _task))
