"""Bootstrap intervals against independent references: scipy.stats.bootstrap for means and
paired differences, a plain loop over scikit-learn's roc_auc_score for the AUCs; exact zeros for
a run paired with itself; stratified draws; the per-sample file and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from toolkit.core import stats
from toolkit.core.errors import UserError
from toolkit.core.metrics import one_vs_rest_auc

# Monte Carlo error of a percentile endpoint: the 2.5% quantile of R bootstrap values has a
# standard error of sqrt(p (1 - p) / R) / phi(1.96) sigma_b = 0.0845 sqrt(1000 / R) sigma_b for a
# near-normal bootstrap distribution of standard deviation sigma_b. Two independent estimates
# (ours, the reference's) differ by sqrt(SE1^2 + SE2^2); 4 of those is the tolerance. The
# effects these tests must see are larger: a 90% instead of a 95% interval moves each endpoint
# by 0.31 sigma_b, an unpaired difference of correlated runs widens it several fold.
QUANTILE_SE = 0.0845  # x sigma_b at R = 1000


def tolerance(sigma_b: float, *resamples: int) -> float:
    return 4 * QUANTILE_SE * sigma_b * sum(1000 / r for r in resamples) ** 0.5


def skewed(n: int, seed: int) -> np.ndarray:
    """PSNR-like values with a long tail: where a percentile and a normal interval differ."""
    return 30 + np.random.default_rng(seed).gamma(2.0, 1.5, n)


def test_mean_interval_agrees_with_scipy_percentile_bootstrap() -> None:
    x = skewed(200, 0)
    r = 20_000  # both sides: a tolerance of 0.11 sigma_b
    ours = stats.bootstrap(stats.mean_statistic(x[:, None]), len(x), resamples=r)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=r, method="percentile",
                                confidence_level=0.95, rng=np.random.default_rng(1))  # fmt: skip
    sigma_b = x.std(ddof=1) / len(x) ** 0.5
    tol = tolerance(sigma_b, r, r)
    assert ours.point[0] == pytest.approx(x.mean(), rel=1e-13)
    assert ours.low[0] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high[0] == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert ours.high[0] - ours.low[0] > 3.5 * sigma_b  # an interval, not a point


def test_paired_difference_agrees_with_scipy_paired_bootstrap_and_is_narrower() -> None:
    """Two runs on the same images: most of each image's value is the image (its difficulty),
    which the pairing cancels."""
    base = skewed(150, 2)
    noise = np.random.default_rng(3).normal(0, 0.05, (2, 150))
    a, b = base + noise[0] + 0.02, base + noise[1]
    r = 20_000
    diff = stats.difference(stats.mean_statistic(a[:, None]), stats.mean_statistic(b[:, None]))
    ours = stats.bootstrap(diff, len(a), resamples=r)
    ref = scipy_stats.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                paired=True, n_resamples=r, method="percentile",
                                rng=np.random.default_rng(4))  # fmt: skip
    sigma_b = (a - b).std(ddof=1) / len(a) ** 0.5
    tol = tolerance(sigma_b, r, r)
    assert ours.point[0] == pytest.approx((a - b).mean(), abs=1e-12)
    assert ours.low[0] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours.high[0] == pytest.approx(ref.confidence_interval.high, abs=tol)
    assert ours.low[0] > 0  # significant: 0.02 dB with 0.07 dB of noise per image, 150 images
    # unpaired, the images' spread (1.5 dB) swamps it: the interval would be ~30x as wide
    unpaired = (stats.bootstrap(stats.mean_statistic(a[:, None]), len(a)).high
                - stats.bootstrap(stats.mean_statistic(a[:, None]), len(a)).low)  # fmt: skip
    assert ours.high[0] - ours.low[0] < unpaired[0] / 10


def classifier(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax-like scores rounded to 2 decimals (ties within and across classes), labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return np.round(p, 2), labels


def test_auc_under_weights_equals_sklearn_with_sample_weights() -> None:
    """One resample's micro and macro AUC are scikit-learn's with the draw's multiplicities as
    sample weights (ties included); the whole sample's are `one_vs_rest_auc`'s."""
    scores, labels = classifier(60, 3, 5)
    stat = stats.auc_statistic(scores, labels)
    onehot = np.eye(3)[labels]
    point = stat(stats.Draw(np.arange(60)[None], 60))[0]
    micro, macro = one_vs_rest_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert point == pytest.approx([micro, macro], abs=1e-12)
    index = np.random.default_rng(6).integers(0, 60, (4, 60))
    got = stat(stats.Draw(index, 60))
    for row, drawn in zip(got, index, strict=True):
        w = np.bincount(drawn, minlength=60)
        want_micro = roc_auc_score(onehot.ravel(), scores.ravel(), sample_weight=np.repeat(w, 3))
        want_macro = np.mean(
            [roc_auc_score(onehot[:, c], scores[:, c], sample_weight=w) for c in range(3)]
        )
        assert row == pytest.approx([want_micro, want_macro], abs=1e-12)


def test_auc_interval_agrees_with_a_plain_stratified_loop_over_sklearn() -> None:
    scores, labels = classifier(90, 3, 7)
    onehot = np.eye(3)[labels]
    rng = np.random.default_rng(8)
    classes = [np.flatnonzero(labels == c) for c in range(3)]
    ref_r = 1000  # scikit-learn's calls take the time: a tolerance of 0.35 sigma_b
    ref = []
    for _ in range(ref_r):  # resample each class on its own: the class counts stay
        i = np.concatenate([rng.choice(idx, len(idx)) for idx in classes])
        # label-indicator input: "micro" pools every (sample, class) pair, "macro" averages
        # the per-class AUCs
        ref.append([roc_auc_score(onehot[i], scores[i], average=a) for a in ("micro", "macro")])
    ref = np.array(ref)
    r = 20_000
    ours = stats.bootstrap(stats.auc_statistic(scores, labels), 90, strata=labels, resamples=r)
    for j in range(2):
        tol = tolerance(ref[:, j].std(ddof=1), r, ref_r)
        assert ours.low[j] == pytest.approx(np.quantile(ref[:, j], 0.025), abs=tol)
        assert ours.high[j] == pytest.approx(np.quantile(ref[:, j], 0.975), abs=tol)


def test_a_run_paired_with_itself_differs_by_exactly_zero() -> None:
    x = np.stack([skewed(50, 9), skewed(50, 10)], 1)
    scores, labels = classifier(50, 3, 11)
    run = stats.concat(stats.mean_statistic(x), stats.auc_statistic(scores, labels))
    out = stats.bootstrap(stats.difference(run, run), 50, strata=labels)
    for part in (out.point, out.low, out.high):
        assert (part == 0).all() and part.shape == (4,)


def test_draws_are_seeded_and_stratified_draws_keep_each_class_count() -> None:
    strata = np.array([0] * 5 + [1] * 3 + [2] * 12)
    (first,) = stats.draws(20, 7, np.random.default_rng(0), strata)
    (again,) = stats.draws(20, 7, np.random.default_rng(0), strata)
    assert (first.index == again.index).all()
    w = first.weights
    assert w.shape == (7, 20)
    for s, count in ((0, 5), (1, 3), (2, 12)):
        assert (w[:, strata == s].sum(axis=1) == count).all()
    # unstratified, the class counts vary between resamples
    (free,) = stats.draws(20, 50, np.random.default_rng(0))
    assert len(set(free.weights[:, strata == 1].sum(axis=1).tolist())) > 1
    x = skewed(20, 12)[:, None]
    one, two = (stats.bootstrap(stats.mean_statistic(x), 20) for _ in range(2))
    other = stats.bootstrap(stats.mean_statistic(x), 20, seed=stats.SEED + 1)
    assert (one.low, one.high) == (two.low, two.high) and one.low != other.low


def test_many_resamples_in_chunks_cover_every_resample(monkeypatch) -> None:
    """Chunks of 3 resamples (CHUNK_CELLS small): 10 resamples come as 3 + 3 + 3 + 1."""
    monkeypatch.setattr(stats, "CHUNK_CELLS", 3 * 20)
    rows = [d.rows for d in stats.draws(20, 10, np.random.default_rng(0))]
    assert rows == [3, 3, 3, 1]


def test_samples_round_trip_sorted_by_key_and_refuse_other_keys(tmp_path) -> None:
    parts = {"model": {"psnr": np.array([3.0, 1.0, 2.0])},
             "bicubic": {"psnr": np.array([30.0, 10.0, 20.0])}}  # fmt: skip
    s = stats.Samples.of(["c", "a", "b"], parts)
    path = tmp_path / "eval.samples.npz"
    s.write(path)
    back = stats.Samples.read(path)
    assert back.keys.tolist() == ["a", "b", "c"]
    assert back.parts["model"]["psnr"].tolist() == [1.0, 2.0, 3.0]
    assert back.parts["bicubic"]["psnr"].tolist() == [10.0, 20.0, 30.0]
    stats.check_paired(back, s, "runs/a", "runs/b")  # the same keys: fine
    other = stats.Samples.of(["a", "b", "d"], {"model": {"psnr": np.zeros(3)}})
    with pytest.raises(UserError) as err:
        stats.check_paired(back, other, "runs/a", "runs/b")
    line = str(err.value)
    assert "\n" not in line and "runs/a and runs/b" in line and "['c']" in line and "['d']" in line


def test_a_bad_samples_file_is_one_user_error_naming_it(tmp_path) -> None:
    path = tmp_path / "eval.samples.npz"
    np.savez(path, keys=np.array(["a", "b"]), **{"model.psnr": np.array([1, 2], dtype=np.int64)})
    with pytest.raises(UserError, match=r"eval\.samples\.npz: array 'model\.psnr' should be"):
        stats.Samples.read(path)
    np.savez(path, keys=np.array(["b", "a"]), **{"model.psnr": np.zeros(2)})
    with pytest.raises(UserError, match="'keys' should be sorted"):
        stats.Samples.read(path)
    np.savez(path, keys=np.array([{"x": 1}], dtype=object))  # would need pickle: refused
    with pytest.raises(UserError, match="not a samples file"):
        stats.Samples.read(path)
    path.write_text("not a zip")
    with pytest.raises(UserError, match="not a samples file"):
        stats.Samples.read(path)
    with pytest.raises(UserError, match="missing"):
        stats.Samples.read(tmp_path / "gone.npz")
