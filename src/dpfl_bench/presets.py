"""Presets: a paper's setting by name, `--preset authors-vision` (or `preset = "..."` in a TOML file or a
suite's [base]).

A preset is a set of flat options and per-method options. It sits above the task's defaults and below
everything given explicitly: a config file, a suite's [base] and grid, and the flags all override it.
Each value says where it comes from; `describe` prints what a run took from it.
"""

from dataclasses import dataclass, field
from typing import Any, Mapping

from dpfl_bench.registry import Registry


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str  # one line: what it reproduces, from which source
    options: Mapping[str, Any]  # flat options, dashed as on the command line
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # method -> its options

    def describe(self, overridden: set[str] = set(), method: str | None = None) -> str:
        """What this preset sets, as `name value` pairs (of the methods' options, `method`'s alone when given);
        the options given explicitly (`overridden`: flat names, and `method.option` for a method's) are named
        apart."""
        taken = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.options.items() if k not in overridden]
        for name, options in self.method_options.items():
            mine = [f"{k}={v}" for k, v in options.items() if f"{name}.{k}" not in overridden]
            if method in (None, name) and mine:
                taken.append(f"{name}: {', '.join(mine)}")
        kept = sorted(o for o in overridden if o in self.options or o.partition(".")[2] in self.method_options.get(o.partition(".")[0], {}))
        return f"preset {self.name} sets " + ", ".join(taken) + (f" (yours instead: {', '.join(kept)})" if kept else "")


PRESETS: Registry[Preset] = Registry("preset")

# Their LA-LoRA: A first, FFT Laplacian smoothing (ls_sigma 1) as an extra step, B at 2x the learning rate.
_AUTHORS_LA_LORA = {"first_factor": "A", "filter": "laplacian", "smooth_sigma": 1.0, "lr_b_multiplier": 2.0}

# The README's vision command (main_lora.py --alg LA-LORA --lr 0.0001 --lr_decay 0.99 --batch_size 16 --K 50
# --E 1 --r 16 --selection 0.5 --optimizer AdamW --epoch 101 --alpha_value 0.1) and DP_lora.py's code:
# 8 clients of 500 examples with class mixes from Dir(0.1), AdamW weight decay 1e-2, lora_alpha = r,
# lora_dropout 0.05, images resized to 256 and center-cropped to 224 (for training too), every tensor of the
# state averaged (the head with the adapters), uniformly. A round walks one shuffled epoch and stops at its
# end (E = 1): with 500 examples in batches of 16 that is 32 steps (the last of 4 examples), not K = 50.
# RoLoRA trains B first here. The task (and so the model) is the user's: the paper's is cifar100, Swin-B.
PRESETS.add("authors-vision", Preset(
    name="authors-vision",
    summary="the LA-LoRA authors' vision runs (their README command and DP_lora.py): Swin on CIFAR, 8 clients × 500",
    options={
        "clients": 8, "client-size": 500, "partition": "dirichlet-mix", "dirichlet-alpha": 0.1, "participation": 0.5,
        "client-selection": "random", "head": "shared", "rounds": 101, "local-steps": 32, "batch-size": 16,
        "batch-order": "epoch", "optimizer": "adamw", "lr": 1e-4, "weight-decay": 0.01, "lr-decay": 0.99,
        "rank": 16, "lora-alpha": 16.0, "lora-dropout": 0.05, "center-crop": 0.875,
    },
    method_options={"la-lora": _AUTHORS_LA_LORA},
))

# The README's GLUE command (DP_LLM.py --lr 0.0002 --alpha_value 1 --epoch 101 --lr_decay 1 --batch_size 16
# --selection 0.2 --num_workers 20 --r 8 --K 20 --optimizer AdamW) and DP_LLM.py's code: an IID split into 20
# clients, the same first 4 every round, lora_alpha = 2r on query, key, value and dense, lora_dropout 0.05;
# only tensors named "lora" are returned and averaged, and each client starts from the global state, so the
# classification head trains within a round and is thrown away (`reset`). RoLoRA trains A first here.
PRESETS.add("authors-glue", Preset(
    name="authors-glue",
    summary="the LA-LoRA authors' GLUE runs (their README command and DP_LLM.py): RoBERTa-base, 20 clients, the first 4 each round",
    options={
        "clients": 20, "partition": "iid", "participation": 0.2, "client-selection": "first", "head": "reset",
        "rounds": 101, "local-steps": 20, "batch-size": 16, "batch-order": "epoch", "optimizer": "adamw", "lr": 2e-4,
        "weight-decay": 0.01, "lr-decay": 1.0, "rank": 8, "lora-alpha": 16.0, "lora-dropout": 0.05,
        "lora-targets": "query,key,value,dense",
    },
    method_options={"la-lora": _AUTHORS_LA_LORA, "rolora": {"first_factor": "A"}},
))
