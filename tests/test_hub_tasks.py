"""The paper's hub tasks, proven on local fixtures through the path users take (no hub on this machine).

Fixtures are built in a temporary folder: an imagefolder, GLUE-shaped Parquet files and a save_to_disk
dataset, a tiny random-init Swin saved as a timm checkpoint, and a tiny RoBERTa with its tokenizer saved
with save_pretrained. Per-example gradients of timm Swin and ViT with LoRA are checked against autograd,
one example at a time; precision and out-of-memory handling are checked on CPU.
"""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dpfl_bench import cli
from dpfl_bench.adapters import add_lora
from dpfl_bench.cli import app
from dpfl_bench.client import summed_gradients, train_client
from dpfl_bench.config import AdapterConfig, SourcesConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor
from dpfl_bench.privacy.per_example import PerExampleGradients, clip_and_sum
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS
from dpfl_bench.tasks.hub import lora_targets_for, parse_model, unreachable

ONE_ROUND = ["--method", "dp-lora", "--rounds", "1", "--local-steps", "2", "--clients", "2", "--participation", "1",
             "--partition", "iid", "--batch-size", "4", "--rank", "2", "--lora-alpha", "2"]
SWIN = {"patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 2), "img_size": 16}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.errors, "width", 1000)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -------------------------------------------------------------------------------------------- fixtures


def _register_tiny_swin() -> str:
    """A timm model name for a tiny Swin with a 32 px input, as a user's own timm model would be."""
    import timm
    from timm.models import generate_default_cfgs, register_model
    from timm.models.swin_transformer import _create_swin_transformer

    name = "dpfl_test_swin"
    if not timm.is_model(name):
        globals()["default_cfgs"] = generate_default_cfgs({name: {
            "input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "num_classes": 10,
            "classifier": "head.fc", "first_conv": "patch_embed.proj",
        }})

        def dpfl_test_swin(pretrained: bool = False, **kwargs):
            return _create_swin_transformer(name, pretrained, **SWIN, **kwargs)

        dpfl_test_swin.__module__ = __name__
        register_model(dpfl_test_swin)
    return name


@pytest.fixture(scope="module")
def image_mirror(tmp_path_factory):
    """An imagefolder of CIFAR-10's 10 classes (2 train and 1 test image each) and a tiny Swin checkpoint
    with a 10-class head."""
    import timm
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for k in range(10):
            (root / "data" / split / f"class{k}").mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(25 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                mode = "L" if i == 0 and k == 0 else "RGB"  # a grayscale image, as Tiny-ImageNet has
                Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(root / "data" / split / f"class{k}" / f"{i}.png")
    name = _register_tiny_swin()
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False).state_dict(), root / "swin.pth")
    return root, name


def _tiny_tokenizer(corpus: list[str]):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=specials)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", model_input_names=["input_ids", "attention_mask"],
    )


@pytest.fixture(scope="module")
def text_mirror(tmp_path_factory):
    """sst2-shaped Parquet files, an rte-shaped save_to_disk dataset and a tiny RoBERTa folder."""
    import datasets
    from transformers import RobertaConfig, RobertaModel

    root = tmp_path_factory.mktemp("glue")
    words = ["good", "bad", "great", "awful", "fine", "movie", "plot", "actor", "the", "a", "was", "is"]
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(48)]
    labels = [int(("good" in s) or ("great" in s)) for s in sentences]
    (root / "sst2").mkdir()
    for split, part in (("train", slice(0, 40)), ("validation", slice(40, 48))):
        frame = pd.DataFrame({"sentence": sentences[part], "label": labels[part], "idx": range(len(labels[part]))})
        frame.to_parquet(root / "sst2" / f"{split}-00000-of-00001.parquet")
    (root / "mnli").mkdir()  # the hub's layout: validation_matched and _mismatched must stay apart
    nli = pd.DataFrame({"premise": sentences, "hypothesis": sentences[::-1], "label": [i % 3 for i in range(48)],
                        "idx": range(48)})
    for split, part in (("train", slice(0, 40)), ("validation_matched", slice(40, 44)),
                        ("validation_mismatched", slice(44, 48)), ("test_matched", slice(40, 42)),
                        ("test_mismatched", slice(42, 44))):
        frame = nli[part].assign(label=-1) if split.startswith("test") else nli[part]
        frame.to_parquet(root / "mnli" / f"{split}-00000-of-00001.parquet")
    pairs = {"sentence1": sentences, "sentence2": sentences[::-1], "label": labels, "idx": list(range(48))}
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({k: v[:40] for k, v in pairs.items()}),
        "validation": datasets.Dataset.from_dict({k: v[40:] for k, v in pairs.items()}),
    }).save_to_disk(str(root / "rte"))
    tokenizer = _tiny_tokenizer(sentences)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(root / "roberta")
    tokenizer.save_pretrained(root / "roberta")
    return root


def test_mnli_from_the_hubs_parquet_layout(text_mirror, tmp_path):
    sources = SourcesConfig(data_dir=str(text_mirror), model_path=str(text_mirror / "roberta"))
    data = TASKS.get("mnli").load_data(sources)
    assert len(data.train) == 40 and len(data.test) == 4 and data.num_classes == 3
    result = invoke("run", "--task", "mnli", *ONE_ROUND, "--eps", "inf", "--data-dir", text_mirror,
                    "--model-path", text_mirror / "roberta", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert list(read_run(next(tmp_path.iterdir()))["task"]) == ["mnli"]


def test_glue_head_is_fresh_even_when_the_checkpoint_has_one_of_the_tasks_size(text_mirror, tmp_path):
    from transformers import AutoConfig, RobertaForSequenceClassification

    config = AutoConfig.from_pretrained(text_mirror / "roberta", num_labels=2)
    torch.manual_seed(1)
    tuned = RobertaForSequenceClassification(config)
    with torch.no_grad():
        for p in tuned.classifier.parameters():  # a fine-tuned head
            p.fill_(0.5)
    tuned.save_pretrained(tmp_path / "tuned")
    built = TASKS.get("sst2").build_model(2, SourcesConfig(model_path=str(tmp_path / "tuned")))
    saved, state = tuned.state_dict(), built.module.model.state_dict()
    for key, value in saved.items():
        if key.startswith("classifier."):
            assert not torch.equal(state[key], value), key
        else:
            assert torch.equal(state[key], value), key


def test_a_tokenizer_without_pad_token_pads_on_the_right_with_eos(text_mirror, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    roberta = PreTrainedTokenizerFast.from_pretrained(text_mirror / "roberta")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=roberta.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(tmp_path / "llama")
    config = LlamaConfig(vocab_size=len(roberta), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=16, num_labels=2, pad_token_id=None, eos_token_id=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "llama")
    sources = SourcesConfig(data_dir=str(text_mirror / "sst2"), model=f"hf:{tmp_path / 'llama'}")
    data = TASKS.get("sst2").load_data(sources)
    ids, mask = data.train.features["input_ids"], data.train.features["attention_mask"]
    assert bool((mask[:, 0] == 1).all()) and bool((ids[mask == 0] == 2).all())  # right padding, with </s>
    built = TASKS.get("sst2").build_model(2, sources)
    assert built.module.model.config.pad_token_id == 2
    result = invoke("run", "--task", "sst2", *ONE_ROUND, "--eps", "inf", "--data-dir", text_mirror / "sst2",
                    "--model", f"hf:{tmp_path / 'llama'}", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------- one round, end to end


def test_cifar10_from_an_imagefolder_and_a_timm_checkpoint(image_mirror, tmp_path):
    root, name = image_mirror
    result = invoke("run", "--task", "cifar10", *ONE_ROUND, "--eps", "8", "--data-dir", root / "data",
                    "--model", f"timm:{name}", "--model-path", root / "swin.pth", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    df = read_run(next(tmp_path.iterdir()))
    assert list(df["model"]) == [f"timm:{name}"] and list(df["task"]) == ["cifar10"]
    assert df["test_accuracy"].between(0, 1).all() and df["eps_spent"].iloc[0] <= 8


def test_timm_checkpoint_loads_the_backbone_and_a_fresh_head_even_of_the_same_shape(image_mirror):
    root, name = image_mirror
    built = TASKS.get("cifar10").build_model(10, SourcesConfig(model=f"timm:{name}", model_path=str(root / "swin.pth")))
    saved = torch.load(root / "swin.pth")
    state = built.module.network.state_dict()
    for key, value in saved.items():
        if key.startswith("head.fc."):  # the checkpoint's head has the task's 10 classes, and is still replaced
            assert state[key].shape == value.shape and not torch.equal(state[key], value), key
        else:
            assert torch.equal(state[key], value), key
    assert built.lora_targets == ("attn.qkv", "attn.proj") and built.heads == ("network.head.fc",)


def test_wrapped_timm_checkpoint_loads(image_mirror, tmp_path):
    root, name = image_mirror
    saved = torch.load(root / "swin.pth")
    torch.save({"state_dict": saved, "epoch": 3}, tmp_path / "wrapped.pth")
    built = TASKS.get("cifar10").build_model(10, SourcesConfig(model=f"timm:{name}", model_path=str(tmp_path / "wrapped.pth")))
    assert torch.equal(built.module.network.state_dict()["layers.1.blocks.1.attn.qkv.weight"], saved["layers.1.blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("damage, fragments", [
    ("partial", ["missing layers.1."]),
    ("prefixed", ["missing", "unexpected backbone."]),
    ("not a checkpoint", ["does not fit"]),
])
def test_partial_or_foreign_timm_checkpoint_is_refused_in_one_line(image_mirror, tmp_path, damage, fragments):
    root, name = image_mirror
    saved = torch.load(root / "swin.pth")
    path = tmp_path / "bad.pth"
    if damage == "partial":
        torch.save({k: v for k, v in saved.items() if not k.startswith("layers.1.")}, path)
    elif damage == "prefixed":
        torch.save({f"backbone.{k}": v for k, v in saved.items()}, path)
    else:
        path.write_text("not a checkpoint")
    with pytest.raises(UserError) as refused:
        TASKS.get("cifar10").build_model(10, SourcesConfig(model=f"timm:{name}", model_path=str(path)))
    message = str(refused.value)
    assert "\n" not in message and f"--model-path {path}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_a_distilled_deit_has_two_heads_and_loads_from_its_checkpoint(tmp_path):
    import timm

    from dpfl_bench.tasks.hub_vision import head_names, load_backbone

    kwargs = {"pretrained": False, "img_size": 32, "depth": 1, "num_classes": 10}
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", **kwargs).state_dict(), tmp_path / "deit.pth")
    network = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs)
    assert head_names(network) == ("head", "head_dist")
    load_backbone(network, "deit_tiny_distilled_patch16_224", str(tmp_path / "deit.pth"))
    assert lora_targets_for(network, head_names(network)) == ("attn.qkv", "attn.proj")


def test_imagefolder_images_are_decoded_to_uint8_at_native_size(image_mirror):
    root, _ = image_mirror
    data = TASKS.get("cifar10").load_data(SourcesConfig(data_dir=str(root / "data")))
    assert data.train.features["pixels"].shape == (20, 32, 32, 3) and data.train.features["pixels"].dtype == torch.uint8
    assert len(data.test) == 10 and data.num_classes == 10
    assert sorted(data.train.labels.tolist()) == sorted(list(range(10)) * 2)


def test_a_mirror_with_another_class_count_is_refused_in_one_line(image_mirror, tmp_path):
    import shutil

    import datasets

    root, _ = image_mirror
    for split in ("train", "test"):
        for k in range(3):
            shutil.copytree(root / "data" / split / f"class{k}", tmp_path / "three" / split / f"class{k}")
    datasets.disable_progress_bars()  # "Generating train split" bars on stderr
    try:
        result = invoke("run", "--task", "cifar10", "--data-dir", tmp_path / "three", "--eps", "inf", "--out", tmp_path / "out")
    finally:
        datasets.enable_progress_bars()
    assert_one_line_error(result, "has 3 classes, cifar10 has 10")


def test_sst2_from_parquet_and_a_save_pretrained_roberta(text_mirror, tmp_path):
    model = text_mirror / "roberta"
    result = invoke("run", "--task", "sst2", *ONE_ROUND, "--eps", "8", "--data-dir", text_mirror / "sst2",
                    "--model", f"hf:{model}", "--out", tmp_path)  # sample-level DP: RoBERTa's per-example path
    assert result.exit_code == 0, result.output
    df = read_run(next(tmp_path.iterdir()))
    assert list(df["model"]) == [f"hf:{model}"] and list(df["dp_level"]) == ["sample"] and df["eps_spent"].iloc[0] <= 8


def test_rte_pairs_from_save_to_disk_with_model_path(text_mirror, tmp_path):
    result = invoke("run", "--task", "rte", *ONE_ROUND, "--eps", "inf", "--data-dir", text_mirror,
                    "--model", "hf:FacebookAI/roberta-base", "--model-path", text_mirror / "roberta", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert list(read_run(next(tmp_path.iterdir()))["model"]) == ["hf:FacebookAI/roberta-base"]


def test_glue_pairs_are_encoded_together_and_padded_to_the_task_length(text_mirror):
    sources = SourcesConfig(data_dir=str(text_mirror / "rte"), model_path=str(text_mirror / "roberta"))
    data = TASKS.get("rte").load_data(sources)
    ids = data.train.features["input_ids"]
    assert ids.shape == (40, 128) and set(data.train.features) == {"input_ids", "attention_mask"}
    assert int((ids[0] == 2).sum()) == 3  # <s> a </s></s> b </s>: both sentences in one sequence
    built = TASKS.get("rte").build_model(2, sources)
    assert built.heads == ("model.classifier",) and built.lora_targets == ("query", "key", "value", "dense")
    params = add_lora(built.module, built.lora_targets, built.heads, AdapterConfig(rank=2))
    assert not any("classifier" in n for n in params.by_factor[Factor.A])  # the head's dense trains in full
    assert "model.classifier.dense.weight" in params.by_factor[Factor.HEAD]


# ------------------------------------------------------------------------------------ errors and specs


def run_offline(*args: object) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with HF_HUB_OFFLINE=1, which the hub libraries read at import."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "dpfl_bench", "run", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def assert_offline_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_hub_unreachable_is_one_line_with_a_mirror_hint(tmp_path):
    done = run_offline("--task", "cifar10", "--out", tmp_path)
    assert_offline_error(done, "dataset uoft-cs/cifar10", "HF_HUB_OFFLINE=1", "save_to_disk", "--data-dir cifar10")


def test_model_unreachable_is_one_line_with_a_mirror_hint(text_mirror, tmp_path):
    done = run_offline("--task", "sst2", "--data-dir", text_mirror / "sst2", "--out", tmp_path)
    assert_offline_error(done, "FacebookAI/roberta-base", "HF_HUB_OFFLINE=1", "save_pretrained", "--model-path")


@pytest.mark.parametrize("args, fragment", [
    (["--task", "fashion", "--data-dir", "."], "--data-dir applies to the hub tasks"),
    (["--task", "synthetic", "--model", "hf:x"], "--model applies to the hub tasks"),
    (["--task", "sst2", "--model", "bert"], "--model must be hf:<id-or-path> or timm:<name>"),
    (["--task", "sst2", "--model", "timm:vit_base_patch16_224"], "GLUE tasks take transformers models"),
    (["--task", "cifar10", "--model", "hf:x"], "cifar10 takes timm backbones"),
    (["--task", "cifar10", "--model", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["--task", "sst2", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a folder"),
    (["--task", "sst2", "--model-path", "/nonexistent"], "--model-path /nonexistent does not exist"),
    (["--precision", "fp8"], "--precision must be fp32, bf16 or fp16"),
    (["--lora-targets", "query,,value"], "--lora-targets takes module-name suffixes"),
    (["--task", "synthetic", "--lora-targets", "nothing"], "no linear or convolution layer"),
])
def test_bad_source_options_are_one_line_errors(args, fragment, tmp_path):
    assert_one_line_error(invoke("run", *args, "--out", tmp_path), fragment)


def test_empty_data_dir_says_which_layouts_it_takes(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("run", "--task", "cifar10", "--data-dir", tmp_path / "empty", "--out", tmp_path)
    assert_one_line_error(result, "holds no dataset", "Parquet files or an imagefolder")


def test_model_spec_parsing():
    assert parse_model("", "timm:swin") == ("timm", "swin")
    assert parse_model("hf:org/name", "timm:swin") == ("hf", "org/name")
    assert parse_model("hf:/a/local:folder", "") == ("hf", "/a/local:folder")


def test_lora_targets_are_chosen_per_architecture():
    import timm
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    assert lora_targets_for(vit, ("head",)) == ("attn.qkv", "attn.proj")
    bert = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    assert lora_targets_for(bert, ("classifier",)) == ("query", "key", "value", "dense")
    llama = LlamaForSequenceClassification(LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=2, intermediate_size=8, vocab_size=16))
    assert lora_targets_for(llama, ("score",)) == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(UserError, match="--lora-targets"):
        lora_targets_for(torch.nn.Sequential(torch.nn.Linear(2, 2)), ())


def test_lora_targets_option_overrides_the_architecture_choice():
    config = build_config({"task": "synthetic", "lora-targets": "query, value", "eps": float("inf")})
    assert config.adapter.targets == ("query", "value")
    from dpfl_bench.federated import prepare

    names = prepare(config).workspace.params.by_factor[Factor.A]
    assert names and all(re.search(r"\.(query|value)\.lora_A\.", n) for n in names)


def test_unreachable_recognises_the_libraries_offline_errors():
    try:
        try:
            raise ConnectionError("no route")
        except ConnectionError as e:
            raise OSError("We couldn't connect") from e
    except OSError as e:
        assert unreachable(e)
    assert not unreachable(ValueError("bad config"))


# -------------------------------------------------------------------------- per-example gradients


def _timm_with_lora(kind: str):
    import timm

    torch.manual_seed(0)
    if kind == "swin":
        model = timm.models.SwinTransformer(num_classes=3, **SWIN)
        heads = ("head.fc",)
    else:
        model = timm.models.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
        heads = ("head",)
    params = add_lora(model, ("attn.qkv", "attn.proj"), heads, AdapterConfig(rank=2, lora_alpha=2.0))
    with torch.no_grad():
        for p in params.by_factor[Factor.B].values():  # nonzero B, so that A's gradients are real too
            p.normal_(0, 0.1)
    for p in params.all().values():
        p.requires_grad_(True)
    return model.eval(), params  # eval: no dropout or drop path, so the brute force sees the same function


@pytest.mark.parametrize("kind, size", [("swin", 16), ("vit", 16)])
def test_per_example_gradients_of_timm_lora_equal_autograd_one_example_at_a_time(kind, size):
    model, params = _timm_with_lora(kind)
    engine = PerExampleGradients(model, params.all())
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 1])
    grads = engine.compute(F.cross_entropy(model(x), y, reduction="none"))
    assert set(grads) == set(params.all())
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        expected = torch.autograd.grad(loss, list(params.all().values()))
        engine.reset()
        for (name, _), g in zip(params.all().items(), expected):
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-5, msg=name)
    engine.remove()


def test_per_example_refuses_a_leading_dim_that_is_not_a_multiple_of_the_batch():
    layer = torch.nn.Linear(4, 2)
    engine = PerExampleGradients(layer, {"weight": layer.weight})
    out = layer(torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="not a multiple of the batch"):
        engine.compute(out.sum(dim=1)[:2])


def test_non_finite_example_contributes_zero():
    grads = {"w": torch.tensor([[3.0, 4.0], [float("inf"), 0.0], [0.3, 0.4]])}
    summed, _ = clip_and_sum(grads, clip=1.0)
    torch.testing.assert_close(summed["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- precision and memory


def _dp_setup(precision: str = "fp32", physical: int = 32):
    """The synthetic task's workspace with per-example clipping, and sample-level DP at a fixed σ = 1 and
    clip 0.5 (no calibration: fast)."""
    from dpfl_bench.federated import prepare
    from dpfl_bench.privacy.mechanism import create_mechanism

    exp = prepare(build_config({"task": "synthetic", "method": "dp-lora", "eps": float("inf"), "device": "cpu",
                                "precision": precision, "physical-batch-size": physical}))
    ws = exp.workspace
    ws.per_example = PerExampleGradients(ws.model, ws.params.all())
    mechanism = create_mechanism(build_config({"task": "synthetic", "eps": 1.0, "clip": 0.5}), [len(c) for c in exp.clients])
    mechanism.noise_multipliers = [1.0] * len(exp.clients)
    return exp, ws, mechanism


def test_bf16_step_changes_the_trainable_parameters_with_clipped_norms_in_fp32(monkeypatch):
    exp, ws, mechanism = _dp_setup("bf16")
    norms_seen = []
    original = ws.per_example.compute

    def recording(losses, loss_scale=1.0):
        grads = original(losses, loss_scale)
        assert all(g.dtype == torch.float32 for g in grads.values())
        summed, norms = clip_and_sum(grads, mechanism.clip)
        norms_seen.append(norms)
        assert torch.isfinite(norms).all()
        # What is summed: each example's scaled gradient (all layers together), clip_and_sum of it alone.
        scaled = [clip_and_sum({n: g[i : i + 1] for n, g in grads.items()}, mechanism.clip)[0] for i in range(len(norms))]
        for one in scaled:
            assert float(torch.sqrt(sum(t.pow(2).sum() for t in one.values()))) <= mechanism.clip * (1 + 1e-5)
        for name in summed:
            torch.testing.assert_close(sum(one[name] for one in scaled), summed[name], rtol=1e-4, atol=1e-6)
        return grads

    monkeypatch.setattr(ws.per_example, "compute", recording)
    before = {n: p.detach().clone() for n, p in ws.model.named_parameters()}
    state = ws.params.state()
    result = train_client(ws, state, exp.clients[0], dataclasses.replace(exp.run, mechanism=mechanism), client=0, round=0)
    assert norms_seen
    trainable = set(ws.params.all())
    for name, p in ws.model.named_parameters():
        if name in trainable and ".lora_A." not in name:  # A gets no gradient while B starts at zero
            assert not torch.equal(p.detach(), before[name]), name
        elif name not in trainable:
            assert torch.equal(p.detach(), before[name]), name
    assert all(torch.isfinite(t).all() for t in result.upload.values())


def test_bf16_private_run_completes(tmp_path):
    result = invoke("run", "--task", "synthetic", "--method", "dp-lora", "--rounds", "1", "--local-steps", "1",
                    "--precision", "bf16", "--eps", "8", "--out", tmp_path)
    assert result.exit_code == 0, result.output


def test_out_of_memory_halves_the_physical_batch_and_gives_the_same_sum(monkeypatch):
    from dpfl_bench.client import set_train_mode

    exp, ws, mechanism = _dp_setup(physical=4)
    data = exp.clients[0]
    with torch.no_grad():
        for p in ws.params.by_factor[Factor.B].values():
            p.normal_(0, 0.1)
    ws.params.set_trainable(frozenset({Factor.A, Factor.B, Factor.HEAD}))
    set_train_mode(ws.model)
    dropouts = [m for m in ws.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for m in dropouts:  # dropout on: a failed attempt draws masks the retry must draw again
        m.p = 0.2
    index = torch.arange(16)
    torch.manual_seed(7)
    seeds = list(range(100, 116))
    expected, loss = summed_gradients(ws, data, index, mechanism.clip, seeds)  # chunks of 4 from the start
    compute = ws.per_example.compute

    def small_memory(losses, loss_scale=1.0):  # after the forward pass: its layers are recorded, masks drawn
        if len(losses) > 4:
            raise torch.cuda.OutOfMemoryError("simulated")
        return compute(losses, loss_scale)

    monkeypatch.setattr(ws.per_example, "compute", small_memory)
    ws.physical_batch_size = 16
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="physical batch size lowered to") as warned:
        summed, halved_loss = summed_gradients(ws, data, index, mechanism.clip, seeds)
    assert [str(w.message)[-1] for w in warned] == ["8", "4"]  # 16 -> 8 -> 4
    assert ws.physical_batch_size == 4
    for name in expected:
        assert torch.equal(summed[name], expected[name]), name
    assert halved_loss == loss


class _TokensFirst(torch.nn.Module):
    """A backbone whose middle layer sees [tokens, batch, features]: with 6 tokens and a batch of 3, the
    leading size is a multiple of the batch, so only the check on the built model can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.embed(x)).transpose(0, 1)))  # [tokens, batch, 8]
        return self.head(h.mean(dim=0))


@pytest.mark.parametrize("tokens_first", [True, False])
def test_a_model_whose_per_example_gradients_mix_examples_is_refused(tokens_first):
    from dpfl_bench.privacy.per_example import check_per_example
    from dpfl_bench.tasks import Examples

    torch.manual_seed(0)
    model = _TokensFirst()
    if not tokens_first:  # the same layers, batch-major
        model.forward = lambda x: model.head(torch.tanh(model.mix(torch.tanh(model.embed(x)))).mean(dim=1))
    params = add_lora(model, ("mix",), ("head",), AdapterConfig(rank=2, lora_alpha=2.0))
    engine = PerExampleGradients(model, params.all())
    examples = Examples({"x": torch.randn(5, 6, 4)}, torch.tensor([0, 1, 0, 1, 1]))
    before, rng = params.state(), torch.random.get_rng_state()
    if tokens_first:
        with pytest.raises(UserError, match=r"toy are not per example \(layer mix\..*--dp-level client"):
            check_per_example(engine, model, params, torch.device("cpu"), examples, "toy")
    else:
        check_per_example(engine, model, params, torch.device("cpu"), examples, "toy")
    assert all(torch.equal(before[n], p) and not p.requires_grad for n, p in params.all().items())
    assert torch.equal(rng, torch.random.get_rng_state()) and model.training


def test_fp16_per_example_gradients_are_close_to_fp32_and_an_overflow_contributes_zero():
    from dpfl_bench.precision import FP16_LOSS_SCALE

    exp, ws, mechanism = _dp_setup("fp16")
    with torch.no_grad():
        for p in ws.params.by_factor[Factor.B].values():
            p.normal_(0, 0.1)
    ws.params.set_trainable(frozenset({Factor.A, Factor.B, Factor.HEAD}))
    ws.model.eval()
    features, labels = exp.clients[0].batch(torch.arange(3))

    def per_example(precision: str, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        ws.precision = precision
        with ws.autocast():
            logits = ws.model(**features)
        losses = F.cross_entropy(logits.float(), labels, reduction="none") * weights
        return ws.per_example.compute(losses, loss_scale=FP16_LOSS_SCALE if precision == "fp16" else 1.0)

    ones = torch.ones(3)
    fp32, fp16 = per_example("fp32", ones), per_example("fp16", ones)
    for name in fp32:
        assert torch.isfinite(fp16[name]).all()
        err = (fp16[name] - fp32[name]).norm()
        assert err <= 0.05 * fp32[name].norm() + 1e-4, name
    overflow = per_example("fp16", torch.tensor([1.0, 1e5, 1.0]))  # example 1's gradient overflows in fp16
    assert not all(torch.isfinite(g[1]).all() for g in overflow.values())
    for name in fp16:
        assert torch.equal(overflow[name][[0, 2]], fp16[name][[0, 2]]), name
    summed, _ = clip_and_sum(overflow, mechanism.clip)
    others, _ = clip_and_sum({n: g[[0, 2]] for n, g in fp16.items()}, mechanism.clip)
    for name in summed:
        torch.testing.assert_close(summed[name], others[name], rtol=1e-5, atol=1e-7)
