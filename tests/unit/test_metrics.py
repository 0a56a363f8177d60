"""MSE / PSNR / SSIM against scikit-image, the classification AUCs and ROC curves against
scikit-learn, and MetricAccumulator (also across 2 gloo ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from tests.helpers import SKIMAGE_SSIM
from toolkit.core import images, metrics
from toolkit.core.metrics import MetricAccumulator
from toolkit.core.seen import Seen, Truth

IMAGE = ("mse", "psnr", "ssim")


def pair(n: int, c: int, size: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HR in [0, 1] with some structure, and SR = HR + clipped Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    smooth = 0.5 + 0.4 * np.sin(6 * xx + 3 * yy) * np.cos(4 * yy)
    hr = np.clip(smooth + 0.1 * rng.random((n, c, size, size)), 0, 1)
    sr = np.clip(hr + noise * rng.standard_normal(hr.shape), 0, 1)
    return sr, hr


def sk_ssim(sr: np.ndarray, hr: np.ndarray) -> float:
    return structural_similarity(sr, hr, channel_axis=0, **SKIMAGE_SSIM)


def image_metrics(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
    return metrics.image_metrics(IMAGE, Seen(sr, Truth(hr)))


CASES = [(c, size, noise) for c in (1, 3) for size in (150, 75, 32) for noise in (0.003, 0.05, 0.4)]


@pytest.mark.parametrize(("c", "size", "noise"), CASES)
def test_ssim_and_psnr_match_scikit_image(c: int, size: int, noise: float) -> None:
    sr, hr = pair(3, c, size, noise, seed=c * 1000 + size)
    got = image_metrics(torch.from_numpy(sr), torch.from_numpy(hr))
    for i in range(len(sr)):
        assert got["ssim"][i].item() == pytest.approx(sk_ssim(sr[i], hr[i]), abs=1e-4)
        ref_psnr = peak_signal_noise_ratio(hr[i], sr[i], data_range=1.0)
        assert got["psnr"][i].item() == pytest.approx(ref_psnr, abs=1e-3)
        assert got["mse"][i].item() == pytest.approx(np.mean((sr[i] - hr[i]) ** 2), rel=1e-12)


def test_ssim_is_exact_to_float64_precision() -> None:
    # Agreement is not just within tolerance: the valid convolution *is* skimage's cropped map.
    sr, hr = pair(2, 3, 40, 0.1)
    got = images.ssim(torch.from_numpy(sr), torch.from_numpy(hr))
    ref = [sk_ssim(sr[i], hr[i]) for i in range(2)]
    assert got.tolist() == pytest.approx(ref, abs=1e-10)


def test_outputs_are_per_image_float64_whatever_the_input_dtype() -> None:
    sr, hr = pair(4, 1, 24, 0.05)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = image_metrics(torch.from_numpy(sr).to(dtype), torch.from_numpy(hr).to(dtype))
        assert set(out) == {"mse", "psnr", "ssim"}
        for v in out.values():
            assert v.shape == (4,) and v.dtype == torch.float64 and v.device.type == "cpu"
    # float32 inputs lose only float32 rounding, far inside the tolerance
    f32 = images.ssim(torch.from_numpy(sr).float(), torch.from_numpy(hr).float())
    assert f32.tolist() == pytest.approx([sk_ssim(sr[i], hr[i]) for i in range(4)], abs=1e-6)


def test_identical_images_cap_psnr_at_100_db_and_give_ssim_one() -> None:
    x = torch.rand(2, 3, 16, 16)
    out = image_metrics(x, x.clone())
    assert out["mse"].tolist() == [0.0, 0.0]
    assert out["psnr"].tolist() == pytest.approx([100.0, 100.0])
    assert out["ssim"].tolist() == pytest.approx([1.0, 1.0])


def test_psnr_is_averaged_per_image_not_from_the_mean_mse() -> None:
    hr = torch.zeros(2, 1, 16, 16)
    sr = torch.stack([torch.full((1, 16, 16), 0.1), torch.full((1, 16, 16), 0.01)])
    psnr = images.psnr(sr, hr)
    assert psnr.tolist() == pytest.approx([20.0, 40.0])
    assert psnr.mean().item() == pytest.approx(30.0)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="one shape"):
        images.mse(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="one shape"):
        images.mse(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        images.ssim(torch.rand(1, 1, 10, 32), torch.rand(1, 1, 10, 32))


def filled(values: dict[str, list[float]], prefix: str = "s") -> MetricAccumulator:
    acc = MetricAccumulator()
    n = len(next(iter(values.values())))
    half = n // 2
    for lo, hi in ((0, half), (half, n)):
        acc.add(
            [f"{prefix}{i}" for i in range(lo, hi)],
            {k: torch.tensor(v[lo:hi], dtype=torch.float32) for k, v in values.items()},
        )
    return acc


def test_accumulator_summary_and_stats() -> None:
    mse = [0.001, 0.004, 0.002, 0.010, 0.003, 0.005, 0.0005]
    psnr = [10 * math.log10(1 / m) for m in mse]
    acc = filled({"mse": mse, "psnr": psnr, "ssim": [0.9, 0.8, 0.95, 0.5, 0.7, 0.99, 0.6]})
    assert acc.count == 7
    summary = acc.summary()
    assert summary["mse"] == pytest.approx(np.mean(mse), rel=1e-6)
    assert summary["psnr"] == pytest.approx(np.mean(psnr), rel=1e-6)
    s = acc.stats("mse")
    assert s["median"] == pytest.approx(0.003, rel=1e-6)
    assert [k for k, _ in s["worst"]] == ["s3", "s5", "s1", "s4", "s2"]  # highest mse first
    assert [k for k, _ in acc.stats("psnr")["worst"]] == ["s3", "s5", "s1", "s4", "s2"]
    worst_ssim = acc.stats("ssim")["worst"]
    assert [k for k, _ in worst_ssim] == ["s3", "s6", "s4", "s1", "s0"]  # lowest ssim first
    assert worst_ssim[0][1] == pytest.approx(0.5)
    # even numbers of samples: the median is the mean of the middle two
    assert filled({"mse": [1.0, 2.0, 3.0, 4.0]}).stats("mse")["median"] == pytest.approx(2.5)


def test_accumulator_rejects_inconsistent_input() -> None:
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="no samples"):
        acc.summary()
    with pytest.raises(ValueError, match="at least one metric"):
        acc.add(["a"], {})
    acc.add(["a", "b"], {"mse": torch.tensor([0.1, 0.2])})
    with pytest.raises(ValueError, match="2 keys but 3 values"):
        acc.add(["c", "d"], {"mse": torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="differ"):
        acc.add(["c"], {"psnr": torch.tensor([30.0])})
    acc.add(["a"], {"mse": torch.tensor([0.3])})
    with pytest.raises(ValueError, match="more than once"):
        acc.gather()


def test_gather_without_a_process_group_is_the_accumulator_itself() -> None:
    assert not dist.is_initialized()
    acc = filled({"mse": [0.1, 0.2]})
    assert acc.gather() is acc


def test_gather_in_a_one_process_group_round_trips(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        acc = filled({"mse": [0.1, 0.2, 0.3], "psnr": [10.0, 7.0, 5.2]})
        merged = acc.gather()
    finally:
        dist.destroy_process_group()
    assert merged is not None and merged is not acc
    assert merged.keys == ["s0", "s1", "s2"]
    assert torch.equal(merged.values("psnr"), acc.values("psnr"))
    assert merged.summary() == acc.summary()


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # Uneven shards, as a real val split gives: rank 0 has 3 samples, rank 1 has 2.
        n = 3 if rank == 0 else 2
        sr, hr = torch.rand(n, 1, 16, 16), torch.rand(n, 1, 16, 16)
        acc = MetricAccumulator()
        acc.add([f"r{rank}-{i}" for i in range(n)], image_metrics(sr, hr))
        merged = acc.gather()
        found = None if merged is None else {"keys": merged.keys, "mse": merged.values("mse")}
        torch.save({"merged": found, "local": acc.values("mse")}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: a few seconds
def test_gather_across_two_gloo_ranks_counts_each_sample_once(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_gather_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected = ["r0-0", "r0-1", "r0-2", "r1-0", "r1-1"]
    assert r0["merged"]["keys"] == expected
    assert r1["merged"] is None  # the per-image values go to rank 0 alone
    assert torch.equal(r0["merged"]["mse"], torch.cat([r0["local"], r1["local"]]))


# --- classification: AUCs and ROC curves against scikit-learn ------------------------------------


def tied_scores(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [n] in 0..k-1 (every class present) and softmax scores [n, k] drawn from only five
    distinct rows, so that many scores tie within each column and across the flattened matrix.
    The rows are probabilities (scikit-learn's multi-class AUC refuses anything else); half the
    samples take the row numbered by their label, so the scores carry information about it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    rows = torch.randn(5, k, generator=g, dtype=torch.float64).softmax(1)
    pick = torch.randint(0, 5, (n,), generator=g)
    pick = torch.where(torch.rand(n, generator=g) < 0.5, labels % 5, pick)  # follow the label
    return rows[pick], labels


def test_auc_of_uniform_scores_is_exactly_one_half() -> None:
    """Every positive ties with every negative: each pair counts half, so the AUC is 0.5
    exactly (not 0 or 1, which ordinal ranks in either order would give)."""
    positive = torch.tensor([True, False, False, True, False, True, False])
    assert metrics.roc_auc(torch.full((7,), 0.3), positive) == 0.5


def test_auc_with_ties_matches_scikit_learn() -> None:
    """Scores on a few levels (ties within and across classes): the Mann-Whitney AUC with
    average ranks equals scikit-learn's trapezoidal area under the ROC curve."""
    g = torch.Generator().manual_seed(3)
    positive = torch.rand(40, generator=g) < 0.4
    scores = torch.randint(0, 4, (40,), generator=g).double() / 4 + 0.2 * positive
    got = metrics.roc_auc(scores, positive)
    ref = skm.roc_auc_score(positive.numpy(), scores.numpy())
    assert 0.6 < ref < 0.99  # the ties matter: neither chance nor perfect separation
    # Two float64 evaluations of the same rational number (a rank sum over n_pos * n_neg
    # against a trapezoid sum): they differ by rounding only, ~1e-16.
    assert got == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize(("n", "k", "seed"), [(30, 3, 0), (61, 4, 1), (12, 2, 2)])
def test_one_vs_rest_micro_and_macro_match_scikit_learn(n: int, k: int, seed: int) -> None:
    """Micro: one AUC over every (sample, class) pair of the one-hot labels; macro: the mean of
    the per-class one-vs-rest AUCs, as scikit-learn computes them."""
    scores, labels = tied_scores(n, k, seed)
    micro, macro = metrics.one_vs_rest_auc(scores, labels)
    y, p = labels.numpy(), scores.numpy()
    onehot = label_binarize(y, classes=list(range(k)))
    if k == 2:  # label_binarize gives one column for two classes
        onehot = np.hstack([1 - onehot, onehot])
    ref_micro = skm.roc_auc_score(onehot.ravel(), p.ravel())
    ref_macro = (
        skm.roc_auc_score(y, p[:, 1])  # scikit-learn's binary case: the positive class's column
        if k == 2
        else skm.roc_auc_score(y, p, average="macro", multi_class="ovr")
    )
    # float64 rounding of the same rational numbers computed two ways (see above)
    assert micro == pytest.approx(ref_micro, abs=1e-12)
    assert macro == pytest.approx(ref_macro, abs=1e-12)
    assert micro != pytest.approx(macro, abs=1e-3)  # the two averages are told apart


def test_roc_curve_points_match_scikit_learn() -> None:
    """The curve has (0, 0), then one point per distinct score from the highest down, ending at
    (1, 1): scikit-learn's roc_curve with drop_intermediate=False, point for point (its default
    drops collinear points, which changes the list but not the curve)."""
    scores, labels = tied_scores(50, 3, 4)
    for c in range(3):
        fpr, tpr = metrics.roc_curve(scores[:, c], labels == c)
        ref_fpr, ref_tpr, _ = skm.roc_curve(
            (labels == c).numpy(), scores[:, c].numpy(), drop_intermediate=False
        )
        # Exact: both divide the same integer counts of false / true positives by the same
        # totals in float64.
        assert fpr == ref_fpr.tolist()
        assert tpr == ref_tpr.tolist()
        assert len(fpr) == len(torch.unique(scores[:, c])) + 1  # the ties share a point


def test_each_score_column_is_scored_against_its_own_class() -> None:
    """Column k holds the scores of class k: a perfect classifier gets AUC 1; the same columns
    shifted by one class (column k now says "class k+1") are scored against label k and get
    the hand-computed 0.25 per class; relabelling classes and columns together changes
    nothing."""
    labels = torch.tensor([0, 1, 2] * 4)
    perfect = F.one_hot(labels, 3).double()
    assert metrics.one_vs_rest_auc(perfect, labels) == (1.0, 1.0)
    # Column k is now 1 for class k+1. Against label k: the 4 positives score 0; of the 8
    # negatives, class k+1 scores 1 (above) and class k+2 scores 0 (a tie, half): AUC
    # (0 * 4 + 0.5 * 4) / 8 = 0.25 for every class.
    shifted = perfect.roll(-1, dims=1)
    assert metrics.one_vs_rest_auc(shifted, labels)[1] == 0.25
    # Renaming the classes (old class perm[j] is called j) in the labels and the columns alike.
    scores, labels = tied_scores(45, 3, 5)
    perm = torch.tensor([2, 0, 1])
    renamed = torch.argsort(perm)[labels]
    micro, macro = metrics.one_vs_rest_auc(scores, labels)
    p_micro, p_macro = metrics.one_vs_rest_auc(scores[:, perm], renamed)
    assert p_micro == micro  # the same rank sums, exact half-integers
    assert p_macro == pytest.approx(macro, abs=1e-15)  # a mean of the same 3 numbers, reordered
    for j in range(3):  # class j's curve is old class perm[j]'s curve
        assert metrics.roc_curve(scores[:, perm][:, j], renamed == j) == metrics.roc_curve(
            scores[:, perm[j]], labels == perm[j]
        )
    # the columns alone permuted (now mismatched with the labels) do change the macro AUC
    assert metrics.one_vs_rest_auc(scores[:, perm], labels)[1] != pytest.approx(macro, abs=1e-3)


def _uneven_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        acc = MetricAccumulator()
        if rank == 1:  # keys out of order, a scalar and a vector (a spectrum) per sample
            acc.add(["c", "a"], {"psnr": torch.tensor([3.0, 1.0]),
                                 "spectrum": torch.tensor([[3.0, 30.0], [1.0, 10.0]])})  # fmt: skip
            acc.add(["b"], {"psnr": torch.tensor([2.0]), "spectrum": torch.tensor([[2.0, 20.0]])})
        merged = acc.gather()  # rank 0 evaluated nothing: it has no names of its own
        found = None
        if merged is not None:
            found = {"keys": merged.keys, "names": merged.names, "scalars": merged.scalars,
                     **{n: merged.values(n) for n in merged.names}}  # fmt: skip
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: a few seconds
def test_gather_keeps_every_value_a_rank_computed_sorted_by_key(tmp_path: Path) -> None:
    """Every name any rank added reaches rank 0 (its own accumulator may be empty), a vector per
    sample included, and the samples come sorted by key: the same order, hence the same means,
    whatever the number of ranks."""
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_uneven_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    assert r0["keys"] == ["a", "b", "c"] and sorted(r0["names"]) == ["psnr", "spectrum"]
    assert r0["scalars"] == ["psnr"]
    assert r0["psnr"].tolist() == [1.0, 2.0, 3.0]
    assert r0["spectrum"].tolist() == [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]
    assert torch.load(tmp_path / "rank1.pt") is None


def test_vector_values_keep_their_width_and_stay_out_of_the_means() -> None:
    acc = MetricAccumulator()
    acc.add(["b", "a"], {"mse": torch.tensor([0.2, 0.1], dtype=torch.float64),
                         "spectrum": torch.ones(2, 3)})  # fmt: skip
    with pytest.raises(ValueError, match="4 values per sample, earlier 3"):
        acc.add(["c"], {"mse": torch.tensor([0.3]), "spectrum": torch.ones(1, 4)})
    assert acc.summary() == {"mse": pytest.approx(0.15)}  # the spectrum is no metric
    assert acc.table(["mse", "spectrum"]).shape == (2, 4)
    assert acc.by_key().keys == ["a", "b"] and acc.by_key().values("mse").tolist() == [0.1, 0.2]
