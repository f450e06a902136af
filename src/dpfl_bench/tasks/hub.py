"""Loading the paper's models and data from the Hugging Face hub or from a local mirror.

Shared by the hub tasks (`hub_vision`, `glue`): parsing `--model`, reading `--data-dir` (a `save_to_disk`
folder, an imagefolder or Parquet files), building timm and transformers models with their head re-created
for the task's classes, choosing LoRA targets per architecture, and turning "the hub cannot be reached"
into one line that says how to provide a mirror.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError

if TYPE_CHECKING:
    from torch import nn

# LoRA targets by architecture family, tried in order: the first set that names layers of the model wins.
KNOWN_TARGETS: tuple[tuple[str, ...], ...] = (
    ("attn.qkv", "attn.proj"),  # timm ViT, Swin, DeiT, BEiT, EVA
    ("query", "key", "value", "dense"),  # BERT, RoBERTa, ELECTRA, DeBERTa-v1
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, OPT
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
)


def parse_model(spec: str, default: str) -> tuple[str, str]:
    """`hf:<id-or-path>` or `timm:<name>` (empty: the task's default) -> (kind, name)."""
    kind, _, name = (spec or default).partition(":")
    return kind, name.strip()


def lora_targets_for(model: "nn.Module", heads: tuple[str, ...]) -> tuple[str, ...]:
    """The first known target set that matches linear layers outside the head."""
    from torch import nn

    names = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == h or n.startswith(h + ".") for h in heads)
    ]
    for targets in KNOWN_TARGETS:
        if any(n == t or n.endswith("." + t) for n in names for t in targets):
            return targets
    raise UserError(
        f"no known LoRA targets for {type(model).__name__}; name its linear layers with --lora-targets, e.g. q,v"
    )


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def unreachable(error: BaseException) -> bool:
    """Whether a loading error means the hub could not be reached (offline mode, no network, not cached)."""
    seen: BaseException | None = error
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, ConnectionError) or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def from_hub(what: str, load: Callable[[], Any], mirror_hint: str) -> Any:
    """Run `load`; if the hub cannot be reached, fail with one line saying which and how to mirror it."""
    try:
        return load()
    except Exception as e:
        if not unreachable(e):
            raise
        why = "HF_HUB_OFFLINE=1 is set" if offline() else "no connection"
        raise UserError(f"{what} could not be reached on the Hugging Face hub ({why}) and is not cached; {mirror_hint}") from None


def load_splits(hub_id: str, config_name: str | None, sources: SourcesConfig, kind: str) -> Any:
    """A DatasetDict: from --data-dir when given (save_to_disk folder, Parquet files or, for images, an
    imagefolder), else from the hub (or its local cache)."""
    import datasets

    if not sources.data_dir:
        saved = config_name or hub_id.rpartition("/")[2]
        args = f"'{hub_id}'" + (f", '{config_name}'" if config_name else "")
        hint = (
            f"on a machine with the hub run `python -c \"from datasets import load_dataset; "
            f"load_dataset({args}).save_to_disk('{saved}')\"`, copy the folder here and pass --data-dir {saved}"
        )
        return from_hub(f"dataset {hub_id}" + (f" ({config_name})" if config_name else ""),
                        lambda: datasets.load_dataset(hub_id, config_name), hint)
    root = Path(sources.data_dir)
    if config_name and (root / config_name).is_dir():  # a mirror of a whole multi-config repository
        root = root / config_name
    if (root / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(root))
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        return datasets.load_dataset("parquet", data_files=parquet_splits(parquet))
    if kind == "image" and any(p.is_dir() for p in root.iterdir()):
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    layouts = "a save_to_disk folder, Parquet files" + (" or an imagefolder (train/ and test/ of class folders)" if kind == "image" else "")
    raise UserError(f"--data-dir {sources.data_dir} holds no dataset; give {layouts}")


def parquet_splits(files: list[Path]) -> dict[str, list[str]]:
    """{split: files} from the hub's file names (`validation_matched-00000-of-00001.parquet`: the text before
    the shard number) or, for numbered shards (`train/0000.parquet`), their folder. datasets' own patterns
    would merge MNLI's validation_matched and validation_mismatched into one `validation` split."""
    splits: dict[str, list[str]] = {}
    for file in files:
        name = re.split(r"-\d+-of-\d+", file.stem)[0]
        if not name or name.isdigit():
            name = file.parent.name
        splits.setdefault(name, []).append(str(file))
    return splits


def split_of(splits: Any, names: tuple[str, ...], data_dir: str) -> Any:
    """The first of `names` present in the dataset."""
    for name in names:
        if name in splits:
            return splits[name]
    where = f"--data-dir {data_dir}" if data_dir else "the dataset"
    raise UserError(f"{where} has no split named {' or '.join(names)} (it has {', '.join(splits)})")


def column_of(split: Any, preferred: str, fallbacks: tuple[str, ...]) -> str:
    for name in (preferred, *fallbacks):
        if name in split.column_names:
            return name
    raise UserError(f"the dataset has no column {preferred!r} (it has {', '.join(split.column_names)})")
