"""The classify task end to end on a tiny labelled set: class folders sharded with --labels,
a CNN trained, and its evaluation (accuracy, micro and macro one-vs-rest AUC, confusion matrix)
equal to scikit-learn's on scores computed here, on 1 process and on 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from tests.helpers import ROOT, evaluate_json
from toolkit import launch
from toolkit.data.format import read_manifest, read_samples
from toolkit.data.sharding import shard
from toolkit.data.sources import decode
from toolkit.reporting import write
from toolkit.runs import recipe
from toolkit.runs.directory import load_model, locate

pytestmark = pytest.mark.slow
CNN = ROOT / "recipes" / "classify" / "cnn.yaml"
CLASSES = ("dots", "line", "none")


def labelled(root: Path, per_class: int = 30, size: int = 32) -> Path:
    """Noise, noise with bright dots, noise with a bright line: told apart by a small CNN in a
    few epochs, not perfectly (the marks are faint and sometimes cut off)."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(0.3, 0.1, (size, size))
            if c == "dots":
                for y, x in rng.integers(0, size, (6, 2)):
                    img[y, x] += rng.uniform(0.3, 0.8)
            elif c == "line":
                row = rng.integers(0, size)
                img[row, rng.integers(0, size // 2) :] += rng.uniform(0.2, 0.5)
            np.save(root / c / f"{i:03d}.npy", img.astype(np.float32))
    return root


def scores_here(run: Path, shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """(softmax scores [N, K], labels [N]) of the val split, from the files and the exported
    weights: not through the loader, the task or the accumulator under test."""
    model = load_model(locate(run))
    manifest = read_manifest(shards)
    images, labels = [], []
    for s in manifest.splits["val"]:
        with open(s.path, "rb") as f:
            for _, sample in read_samples(f, 0, s.count, lambda _: True):
                images.append(torch.from_numpy(decode(sample["hr.npy"], "npy")))
                labels.append(int(sample["cls"]))
    with torch.no_grad():
        p = model(torch.stack(images)).softmax(dim=1).double().numpy()
    return p, np.array(labels)


def test_a_cnn_classifies_and_its_scores_are_scikit_learn_s(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    manifest = shard(labelled(tmp_path / "src"), shards, val_fraction=0.3, seed=0, labels=True)
    assert manifest["classes"] == list(CLASSES)
    assert [sum(x) for x in zip(*manifest["class_counts"].values(), strict=True)] == [30] * 3
    assert all(n > 0 for n in manifest["class_counts"]["val"])  # every class is in val
    run = tmp_path / "cnn"
    overrides = [f"data.shards={shards}", f"run.dir={run}", "model.img_size=32",
                 "model.channels=8", "model.depth=2", "data.batch_size=8", "data.num_workers=0",
                 "train.epochs=15", "train.precision=no", "deepspeed=null", "optim.lr=3e-3",
                 "train.log_every=1"]  # fmt: skip
    assert launch.main([str(CNN), *overrides, "--local"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    p, y = scores_here(run, shards)
    onehot = np.eye(3)[y]
    assert ev["count"] == len(y) == sum(manifest["class_counts"]["val"])
    assert ev["model"]["auc_micro"] == pytest.approx(roc_auc_score(onehot.ravel(), p.ravel()),
                                                     abs=1e-6)  # fmt: skip
    assert ev["model"]["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"),
                                                     abs=1e-6)  # fmt: skip
    assert ev["model"]["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert ev["confusion"] == confusion_matrix(y, p.argmax(1)).tolist()
    assert ev["classes"] == list(CLASSES) and set(ev["roc"]) == set(CLASSES)
    assert 0.75 < ev["model"]["auc_micro"] < 1.0  # it learnt, not everything
    doc = write.report([run], tmp_path / "report")
    table = doc["tables"][0]
    assert table["task"] == "classify" and table["columns"] == [
        "accuracy",
        "auc_micro",
        "auc_macro",
    ]
    assert table["rows"][0]["auc_micro"] == ev["model"]["auc_micro"]
    assert "| AUC (micro) |" in (tmp_path / "report" / "results.md").read_text()
    with Image.open(tmp_path / "report" / "roc_cnn.png") as img:
        assert img.size[0] > 500  # ROC curves and the confusion matrix side by side
    two = evaluate_json(str(run), "--local", "--procs", "2")
    for k in ("accuracy", "auc_micro", "auc_macro"):
        assert two["model"][k] == pytest.approx(ev["model"][k], abs=1e-6), k
    assert two["confusion"] == ev["confusion"]


def test_the_shipped_cnn_recipe_trains_under_deepspeed_bf16(tmp_path: Path) -> None:
    """recipes/classify/cnn.yaml as shipped (bf16, ZeRO-2 from _base.yaml) stopped at its first
    step: DeepSpeed casts the batch norms' weights to bf16 and leaves their statistics fp32."""
    shards = tmp_path / "shards"
    shard(labelled(tmp_path / "src", per_class=10), shards, val_fraction=0.3, seed=0, labels=True)
    run = tmp_path / "cnn"
    overrides = [f"data.shards={shards}", f"run.dir={run}", "model.img_size=32",
                 "model.channels=4", "model.depth=2", "data.batch_size=4", "data.num_workers=0",
                 "train.max_steps=2"]  # fmt: skip
    assert launch.main([str(CNN), *overrides, "--local"]) == 0
    ran = recipe.load(run / "recipe.yaml")
    assert ran.train.precision == "bf16" and ran.deepspeed and ran.deepspeed.zero_stage == 2
    weights = load_file(str(run / "model.safetensors"))
    assert weights["body.1.weight"].dtype == torch.float32  # the export is fp32
    assert json.loads((run / "eval.json").read_text())["count"] == read_manifest(shards).count(
        "val"
    )


def test_label_efficiency_runs_train_on_nested_per_class_subsets(tmp_path: Path) -> None:
    """data.per_class 5 on 3 classes: exactly 15 samples trained on (the step count says so),
    recorded key by key in subset.json, the same for train.seed 0 and 1, a superset of the
    per_class 2 run's 6; validation is evaluated whole."""
    shards = tmp_path / "shards"
    shard(labelled(tmp_path / "src", per_class=12), shards, val_fraction=0.3, seed=0, labels=True)
    val = read_manifest(shards).count("val")
    base = [f"data.shards={shards}", "model.img_size=32", "model.channels=4", "model.depth=1",
            "data.batch_size=4", "data.num_workers=0", "train.precision=no", "deepspeed=null",
            "train.epochs=2", "train.log_every=1", "optim.scheduler.name=constant"]  # fmt: skip

    def run(name: str, *overrides: str) -> tuple[list[str], dict]:
        d = tmp_path / name
        assert launch.main([str(CNN), *base, f"run.dir={d}", *overrides, "--local"]) == 0
        keys = json.loads((d / "subset.json").read_text())["keys"]
        record = json.loads((d / "data.json").read_text())
        steps = [
            x["step"] for x in map(json.loads, (d / "metrics.jsonl").open()) if "train/loss" in x
        ]
        assert steps == list(range(1, 2 * -(-len(keys) // 4) + 1))  # 2 epochs of ceil(n / 4)
        assert record["count"] == {"train": len(keys), "val": val}
        assert json.loads((d / "eval.json").read_text())["count"] == val
        return keys, record

    five, record = run("five", "data.per_class=5")
    assert len(five) == 15 and sorted(k.split("/")[0] for k in five) == sorted(CLASSES * 5)
    assert record["subset"]["count"] == 15 and record["subset"]["per_class"] == 5
    again, other = run("five-seed1", "data.per_class=5", "train.seed=1")
    assert again == five and other["subset"]["keys_sha256"] == record["subset"]["keys_sha256"]
    two, _ = run("two", "data.per_class=2")
    assert len(two) == 6 and set(two) < set(five)


def test_a_run_with_a_holdout_evaluates_on_it_and_needs_no_val_split(tmp_path: Path) -> None:
    """data.holdout on shards without a val split: the run trains on the rest, evaluates on
    the held-out samples (eval.json says "holdout", with their count), and `evaluate` on the
    run reads the same samples and gives the same numbers."""
    shards = tmp_path / "shards"
    shard(labelled(tmp_path / "src", per_class=8), shards, val_fraction=0.0, seed=0, labels=True)
    assert not read_manifest(shards).count("val")
    d = tmp_path / "run"
    overrides = [f"data.shards={shards}", "model.img_size=32", "model.channels=4",
                 "model.depth=1", "data.batch_size=4", "data.num_workers=0",
                 "train.precision=no", "deepspeed=null", "train.epochs=1",
                 "data.holdout=0.25", f"run.dir={d}"]  # fmt: skip
    assert launch.main([str(CNN), *overrides, "--local"]) == 0
    record = json.loads((d / "data.json").read_text())["subset"]
    held, trained = record["held_out"], record["count"]
    assert 0 < held < 24 and held + trained == 24
    ev = json.loads((d / "eval.json").read_text())
    assert ev["split"] == "holdout" and ev["count"] == held
    again = evaluate_json(str(d))
    assert again["split"] == "holdout" and again["count"] == held
    assert again["model"] == ev["model"]
