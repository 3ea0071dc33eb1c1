"""Tests for firmad.scoring: scorers on synthetic features, kNN backends, feature extraction,
and score_run with tiny stand-in encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from firmad import augment
from firmad.config import EvalConfig
from firmad.errors import ConfigError, InputError
from firmad.scoring import (
    ANGLES,
    SCORERS,
    ExtractOptions,
    FeatureExtractor,
    ScoreOptions,
    VariantScorer,
    build_scorer,
    extract_banks,
    extract_features,
    knn_similarities,
    score_run,
    scorer_specs,
)
from firmad.scoring import base as scoring_base

# Every registered scorer at its defaults (and kNN with k = 1), except the logit scorer,
# which scores a classifier's logits rather than features, and the scorers fitted on the
# features of 4 rotations (rotation, maha_rotation; each tested on its own below).
FEATURE_SCORERS = [("knn_cos", {"k": 1})] + [
    (n, {}) for n in SCORERS if n not in ("logit", "rotation", "maha_rotation")
]


def _blob(rng: np.random.Generator, n: int, centre: np.ndarray, spread: float = 1.0):
    return (centre + spread * rng.normal(size=(n, centre.size))).astype(np.float32)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    d = 16
    centre = np.zeros(d)
    centre[:4] = 4.0  # a direction, so cosine-based scorers see the blob too
    bank = _blob(rng, 400, centre)
    normal = _blob(rng, 300, centre)
    # far away: the opposite direction and further out
    far = _blob(rng, 300, -2.0 * centre)
    same = _blob(rng, 300, centre)
    return bank, normal, far, same


@pytest.mark.parametrize(("name", "params"), FEATURE_SCORERS, ids=lambda v: str(v))
def test_scorers_separate_far_points(blobs, name, params) -> None:
    bank, normal, far, _ = blobs
    scorer = build_scorer(name, **params).fit(bank)
    s_norm, s_far = scorer.score(normal), scorer.score(far)
    assert s_norm.shape == (300,) and s_norm.dtype == np.float64
    assert np.isfinite(s_norm).all() and np.isfinite(s_far).all()
    labels = np.r_[np.zeros(300), np.ones(300)]
    assert roc_auc_score(labels, np.r_[s_norm, s_far]) > 0.99


@pytest.mark.parametrize(("name", "params"), FEATURE_SCORERS, ids=lambda v: str(v))
def test_scorers_chance_on_identical_distributions(blobs, name, params) -> None:
    bank, normal, _, same = blobs
    scorer = build_scorer(name, **params).fit(bank)
    labels = np.r_[np.zeros(300), np.ones(300)]
    auroc = roc_auc_score(labels, np.r_[scorer.score(normal), scorer.score(same)])
    assert abs(auroc - 0.5) < 0.08


def test_knn_cos_values() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scorer = build_scorer("knn_cos", k=1).fit(bank)
    # bank points have cosine 1 to themselves
    np.testing.assert_allclose(scorer.score(bank * 3.0), -1.0, atol=1e-6)
    s2 = build_scorer("knn_cos", k=2).fit(bank).score(torch.tensor([[2.0, 0.0]]))
    np.testing.assert_allclose(s2, [-(1.0 + 1 / np.sqrt(2)) / 2], atol=1e-6)


def test_knn_cos_norm_is_knn_cos_times_norm(blobs) -> None:
    bank, normal, _, _ = blobs
    plain = build_scorer("knn_cos", k=5).fit(bank).score(normal)
    normed = build_scorer("knn_cos_norm", k=5).fit(bank).score(normal)
    np.testing.assert_allclose(normed, plain * np.linalg.norm(normal, axis=1), rtol=1e-5)


def test_kde_matches_formula(blobs) -> None:
    bank, normal, _, _ = blobs
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    xn = normal / np.linalg.norm(normal, axis=1, keepdims=True)
    var = bn.astype(np.float64).var(axis=0).mean()
    gamma = 20.0 / (var * bank.shape[1])
    z = gamma * (xn.astype(np.float64) @ bn.T.astype(np.float64))
    m = z.max(axis=1, keepdims=True)
    ref = -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1))) / gamma
    got = build_scorer("kde").fit(bank).score(normal)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_centre_matches_formula(blobs) -> None:
    bank, normal, _, _ = blobs
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    c = bn.mean(axis=0)
    c /= np.linalg.norm(c)
    ref = -(normal / np.linalg.norm(normal, axis=1, keepdims=True)) @ c
    np.testing.assert_allclose(build_scorer("centre").fit(bank).score(normal), ref, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_faiss_and_torch_backends_agree(blobs, monkeypatch, k) -> None:
    pytest.importorskip("faiss")
    bank, normal, far, _ = blobs
    test = np.r_[normal, far]
    s_faiss = build_scorer("knn_cos", k=k, knn_backend="faiss").fit(bank).score(test)
    # a tiny chunk bound forces the chunked torch path through many chunks
    monkeypatch.setattr(scoring_base, "MAX_CHUNK_ELEMENTS", 400 * 70)
    s_torch = build_scorer("knn_cos", k=k, knn_backend="torch").fit(bank).score(test)
    np.testing.assert_allclose(s_faiss, s_torch, atol=1e-5)
    sims = knn_similarities(torch.from_numpy(bank), torch.from_numpy(test), k, "torch")
    assert sims.shape == (600, k)
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_kde_chunking_does_not_change_scores(blobs, monkeypatch) -> None:
    bank, normal, _, _ = blobs
    full = build_scorer("kde").fit(bank).score(normal)
    monkeypatch.setattr(scoring_base, "MAX_CHUNK_ELEMENTS", 400 * 70)
    np.testing.assert_allclose(build_scorer("kde").fit(bank).score(normal), full, rtol=1e-6)


def test_mahalanobis_rank_deficient() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(10, 6))
    bank = np.concatenate([base, base, base, np.ones((10, 2))], axis=1)  # 20 dims, rank 6
    assert bank.shape == (10, 20)
    scorer = build_scorer("mahalanobis").fit(bank)
    near = bank[:3]
    far = near + 25.0
    s_near, s_far = scorer.score(near), scorer.score(far)
    assert np.isfinite(s_near).all() and np.isfinite(s_far).all()
    assert s_far.min() > s_near.max()
    # even a constant bank does not fail
    const = build_scorer("mahalanobis").fit(np.ones((5, 4)))
    assert np.isfinite(const.score(np.zeros((2, 4)))).all()


def test_ocsvm_caps_bank_deterministically(blobs) -> None:
    bank, normal, _, _ = blobs
    a = build_scorer("ocsvm_rbf", max_bank=50, seed=3).fit(bank)
    b = build_scorer("ocsvm_rbf", max_bank=50, seed=3).fit(bank)
    np.testing.assert_array_equal(a.score(normal), b.score(normal))
    # the cap is a seeded draw of 50 bank rows: fitting on exactly those rows gives the same SVM
    keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(3))[:50]
    c = build_scorer("ocsvm_rbf").fit(torch.as_tensor(bank)[keep.sort().values])
    np.testing.assert_allclose(a.score(normal), c.score(normal), rtol=1e-6, atol=1e-9)


def test_svdd_and_logit() -> None:
    c = torch.tensor([1.0, 2.0])
    s = build_scorer("svdd", c=c).fit(None).score(torch.tensor([[1.0, 2.0], [4.0, 6.0]]))
    np.testing.assert_allclose(s, [0.0, 25.0])
    out = torch.tensor([0.3, -1.0, 2.0])
    np.testing.assert_allclose(build_scorer("logit").fit(None).score(out), [0.3, -1.0, 2.0])
    np.testing.assert_allclose(
        build_scorer("logit", negate=True).score(out[:, None]), [-0.3, 1.0, -2.0], rtol=1e-6
    )
    with pytest.raises(InputError):
        build_scorer("logit").score(torch.zeros(3, 2))


def _rotation_banks(rng: np.random.Generator, n: int, recognisable: bool = True):
    """Features of n images at each of the 4 rotations: each rotation its own blob when the
    rotation is recognisable, one blob for all of them when it is not."""
    d = 8
    centres = {a: np.eye(d)[i] * 4.0 for i, a in enumerate(ANGLES)}
    return {
        a: torch.as_tensor(_blob(rng, n, centres[a] if recognisable else np.zeros(d)))
        for a in ANGLES
    }


def test_rotation_scorer_flags_images_whose_rotation_cannot_be_told() -> None:
    rng = np.random.default_rng(0)
    bank = _rotation_banks(rng, 200)
    normal, other = _rotation_banks(rng, 100), _rotation_banks(rng, 100, recognisable=False)
    labels = np.r_[np.zeros(100), np.ones(100)]
    for variant in ("plain", "angled"):
        vs = VariantScorer("rotation", variant=variant)
        assert vs.bank_angles == ANGLES  # fitted on every rotation, whatever the variant
        vs.fit(bank)
        with torch.no_grad():
            scores = np.r_[vs.combine(normal).numpy(), vs.combine(other).numpy()]
        assert roc_auc_score(labels, scores) > 0.99, variant
        assert scores[:100].mean() < 0.1 < np.log(4) - 0.5 < scores[100:].mean()


def test_rotation_scorer_gives_probabilities_of_the_4_rotations() -> None:
    """The 4 copies of an angled rotation scorer read one classifier: for any features, the
    probabilities exp(-score) of the 4 rotations sum to 1."""
    rng = np.random.default_rng(1)
    vs = VariantScorer("rotation", variant="angled").fit(_rotation_banks(rng, 50))
    x = torch.as_tensor(rng.normal(size=(30, 8)) * 3)
    total = sum(torch.exp(-copy(x)) for copy in vs.per_angle)
    np.testing.assert_allclose(total.detach().numpy(), 1.0, rtol=1e-9)
    assert [int(copy.target_) for copy in vs.per_angle] == [0, 1, 2, 3]


def test_rotation_scorer_errors() -> None:
    with pytest.raises(InputError, match="4 rotations"):
        build_scorer("rotation").fit(torch.zeros(10, 3))
    with pytest.raises(ConfigError, match="c must be"):
        build_scorer("rotation", c=0)
    with pytest.raises(ConfigError, match="max_iter"):
        build_scorer("rotation", max_iter=0)
    with pytest.raises(InputError, match="at least 2"):
        build_scorer("rotation").fit({a: torch.zeros(1, 3) for a in ANGLES})


def test_maha_rotation_is_the_mean_of_its_standardised_parts() -> None:
    """Normals: each rotation its own blob. Anomalies of two kinds: off the normal blob with
    the rotation still clear (the rotation scorer alone misses them), and at the normals' mean
    of all rotations (no rotation to tell). The combined score flags both kinds, and it is the
    mean of the Mahalanobis and rotation scores fitted on the whole bank, each standardised by
    the scorer's stored centre and spread."""
    rng = np.random.default_rng(3)
    d, n = 8, 300
    centres = {a: np.eye(d)[i] * 3.0 for i, a in enumerate(ANGLES)}
    mean = np.mean(list(centres.values()), axis=0)
    far = np.r_[np.zeros(d - 1), 6.0]

    def feats(m: int, centre=lambda a: centres[a]):
        return {a: torch.as_tensor(_blob(rng, m, centre(a), 0.5)) for a in ANGLES}

    bank = feats(n)
    tests = [feats(100), feats(100, lambda a: centres[a] + far), feats(100, lambda a: mean)]
    kinds = {"far": np.r_[0:200], "no rotation": np.r_[0:100, 200:300]}
    labels = np.r_[np.zeros(100), np.ones(100)]
    scores = {}
    for name in ("rotation", "maha_rotation"):
        vs = VariantScorer(name, variant="angled").fit(bank)
        with torch.no_grad():
            scores[name] = np.concatenate([vs.combine(t).numpy() for t in tests])
        if name == "maha_rotation":
            combined = vs
    auroc = {n: {k: roc_auc_score(labels, s[i]) for k, i in kinds.items()}
             for n, s in scores.items()}  # fmt: skip
    assert min(auroc["maha_rotation"].values()) > 0.99 and auroc["rotation"]["far"] < 0.9, auroc
    x = tests[1][90]
    one = combined.per_angle[1]
    maha = build_scorer("mahalanobis").fit(bank[90]).score(x)
    rot = VariantScorer("rotation", variant="angled").fit(bank).per_angle[1].score(x)
    centre, spread = one.centre_.numpy(), one.spread_.numpy()
    want = ((maha - centre[0]) / spread[0] + (rot - centre[1]) / spread[1]) / 2
    np.testing.assert_allclose(one.score(x), want, rtol=1e-9)


def test_maha_rotation_is_standardised_out_of_fold() -> None:
    """Each part is standardised by scores of bank features its fit did not see: new normals
    score about 0 on average (in-sample scores would put them above 0), the copies of the
    angled variant read one fit at their own rotation, and the fit is reproducible."""
    rng = np.random.default_rng(4)
    bank, normals = _rotation_banks(rng, 400), _rotation_banks(rng, 2000)
    vs = VariantScorer("maha_rotation", variant="angled").fit(bank)
    assert [int(s.target_) for s in vs.per_angle] == [0, 1, 2, 3]
    with torch.no_grad():
        scores = vs.combine(normals).numpy()
    assert abs(scores.mean()) < 0.15, scores.mean()
    again = VariantScorer("maha_rotation", variant="angled").fit(bank)
    with torch.no_grad():
        np.testing.assert_array_equal(again.combine(normals).numpy(), scores)
    other = VariantScorer("maha_rotation:seed=1", variant="angled").fit(bank)
    assert not torch.equal(other.per_angle[0].centre_, vs.per_angle[0].centre_)


def test_maha_rotation_errors() -> None:
    with pytest.raises(InputError, match="4 rotations"):
        build_scorer("maha_rotation").fit(torch.zeros(10, 3))
    with pytest.raises(ConfigError, match="folds"):
        build_scorer("maha_rotation", folds=1)
    with pytest.raises(ConfigError, match="c must be"):
        build_scorer("maha_rotation", c=-1)
    with pytest.raises(InputError, match="at least 4"):
        build_scorer("maha_rotation").fit({a: torch.zeros(3, 3) for a in ANGLES})
    small = {a: torch.randn(6, 3, generator=torch.Generator().manual_seed(i))
             for i, a in enumerate(ANGLES)}  # fmt: skip
    assert torch.isfinite(build_scorer("maha_rotation").fit(small).spread_).all()  # 3 folds
    loaded = build_scorer("maha_rotation").load_fitted(
        build_scorer("maha_rotation").fit(small).fitted_state()
    )
    with pytest.raises(InputError, match="fit it again"):
        loaded.at_angle(90)
    with pytest.raises(InputError, match="same images"):
        build_scorer("maha_rotation").fit({a: torch.zeros(20 + i, 3) for i, a in enumerate(ANGLES)})


# The default scorers of a recipe (the one list of them, in the config).
DEFAULT_SCORERS = scorer_specs(EvalConfig().scorers)


def test_registry_and_errors(blobs) -> None:
    bank = blobs[0]
    assert {s.name for s in DEFAULT_SCORERS} <= set(SCORERS)  # the recipe default
    with pytest.raises(ConfigError, match="knn_cos.*mahalanobis"):
        build_scorer("nearest")
    with pytest.raises(
        ConfigError, match="scorer 'kde:k=3': unknown parameter 'k'; allowed: scale"
    ):
        build_scorer("kde", k=3)
    with pytest.raises(ConfigError):
        build_scorer("knn_cos", k=0)
    with pytest.raises(InputError, match="not fitted"):
        build_scorer("knn_cos").score(bank)
    with pytest.raises(InputError, match="k=5"):
        build_scorer("knn_cos", k=5).fit(bank[:3]).score(bank)
    with pytest.raises(InputError, match="dimensions"):
        build_scorer("centre").fit(bank).score(bank[:, :5])
    with pytest.raises(InputError, match="NaN"):
        build_scorer("centre").fit(np.full((3, 2), np.nan))


# --------------------------------------------------------------------------- features


class _Pool(nn.Module):
    """Stand-in encoder: 4x4 average pooling, flattened (no parameters needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 4).flatten(1)


def _tiny_conv(in_ch: int = 3, dim: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_ch, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, dim),
    )


def _images(n: int, c: int = 3, hw: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


def test_extract_features_pipeline_and_rotation() -> None:
    imgs = _images(7, c=1, hw=14)
    flat = nn.Flatten()
    for angle in (0, 90, 180, 270):
        feats = extract_features(flat, imgs, ExtractOptions(16, batch_size=3), angle=angle)
        # images not at the training size are first resized to it, as in training
        x = augment.test_transform(augment.to_float(imgs, size=16, channels=3), 16, 1.125)
        ref = augment.rotate90(x, angle // 90).flatten(1)
        assert feats.dtype == torch.float32 and feats.shape == (7, 3 * 16 * 16)
        torch.testing.assert_close(feats, ref)
    # resize_ratio 1.0 disables the centre crop
    feats = extract_features(flat, imgs, ExtractOptions(16, resize_ratio=1.0, channels=1))
    torch.testing.assert_close(feats, augment.to_float(imgs, size=16, channels=1).flatten(1))


def test_extract_features_modes_crops_and_determinism() -> None:
    enc = _tiny_conv()
    enc.train()
    enc[1].eval()  # a mixed-mode module must come back exactly as it was
    imgs = _images(10)
    f1 = extract_features(enc, imgs, ExtractOptions(8, batch_size=4))
    assert enc.training and enc[0].training and not enc[1].training
    f2 = extract_features(enc, imgs, ExtractOptions(8, batch_size=10))
    torch.testing.assert_close(f1, f2)  # eval mode: batch size does not matter
    crops = extract_features(
        enc, imgs, ExtractOptions(8), crops=3, gen=torch.Generator().manual_seed(1)
    )
    again = extract_features(
        enc, imgs, ExtractOptions(8), crops=3, gen=torch.Generator().manual_seed(1)
    )
    assert crops.shape == (3, 10, 8)
    torch.testing.assert_close(crops, again)
    assert not torch.allclose(crops[0], crops[1])


def test_extract_features_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="uint8"):
        extract_features(nn.Flatten(), torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match="multiple of 90"):
        extract_features(nn.Flatten(), _images(2), angle=45)


# --------------------------------------------------------------------------- score_run


def _striped(n: int, vertical: bool, seed: int) -> torch.Tensor:
    """Normals: horizontal stripes; anomalies: vertical stripes; both with noise."""
    g = torch.Generator().manual_seed(seed)
    stripes = (torch.arange(16) % 4 < 2).float() * 160
    pattern = stripes[None, :].expand(16, 16) if vertical else stripes[:, None].expand(16, 16)
    noise = torch.randint(0, 60, (n, 1, 16, 16), generator=g).float()
    return (pattern + noise).clamp(0, 255).to(torch.uint8)


def test_score_run_all_variants_and_keys() -> None:
    train = _striped(40, vertical=False, seed=0)
    test = torch.cat([_striped(15, False, 1), _striped(15, True, 2)])
    labels = torch.cat([torch.zeros(15), torch.ones(15)]).long()
    results, details = score_run(
        _Pool(),
        train,
        test,
        labels,
        scorers=DEFAULT_SCORERS,
        variants=("plain", "angled", "ensemble"),
        options=ScoreOptions(size=16, n_crops=2, batch_size=16),
        return_details=True,
    )
    assert len(results) == len(DEFAULT_SCORERS) * 3
    keys = {"scorer", "label", "params", "k", "variant", "auroc", "aupr_anomaly", "aupr_normal",
            "fpr95"}  # fmt: skip
    for r in results:
        assert set(r) == keys
        assert all(0.0 <= r[m] <= 1.0 for m in ("auroc", "aupr_anomaly", "aupr_normal", "fpr95"))
    assert {r["variant"] for r in results} == {"plain", "angled", "ensemble"}
    assert [r["k"] for r in results if r["scorer"] == "knn_cos"] == [1, 1, 1, 5, 5, 5]
    assert all(r["k"] is None for r in results if r["scorer"] == "kde")
    # the stripe orientation is easy to see for the plain kNN scorer
    plain_knn = [r for r in results if r["scorer"] == "knn_cos" and r["variant"] == "plain"]
    assert all(r["auroc"] > 0.95 for r in plain_knn)
    assert len(details["scores"]) == len(results)
    assert details["test_features"].shape == (30, 3 * 4 * 4)
    np.testing.assert_array_equal(details["labels"], labels.numpy())


def test_score_run_fits_the_rotation_scorer_on_every_rotation() -> None:
    """Plain alone still gives the rotation scorer the banks of all 4 rotations; a vertical
    stripe is a horizontal one turned by 90 degrees, so the upright read-out flags it."""
    train = _striped(40, vertical=False, seed=0)
    test = torch.cat([_striped(15, False, 1), _striped(15, True, 2)])
    labels = torch.cat([torch.zeros(15), torch.ones(15)]).long()
    results = score_run(_Pool(), train, test, labels, scorers=["rotation"],
                        variants=("plain", "angled"), options=ScoreOptions(size=16))  # fmt: skip
    assert [r["variant"] for r in results] == ["plain", "angled"]
    assert all(r["auroc"] > 0.95 for r in results)
    (plain,) = score_run(_Pool(), train, test, labels, scorers=["rotation"],
                         options=ScoreOptions(size=16))  # fmt: skip
    assert plain["auroc"] == results[0]["auroc"]


def test_score_run_plain_matches_manual_and_bank_subset() -> None:
    enc = _tiny_conv(in_ch=3)
    train, test = _images(30, seed=1), _images(20, seed=2)
    labels = torch.tensor([0, 1] * 10)
    kw = dict(scorers=[("knn_cos", {"k": 2})])
    (res,) = score_run(
        enc, train, test, labels, **kw, options=ScoreOptions(size=8, knn_backend="torch")
    )
    bank = extract_features(enc, train, ExtractOptions(8))
    knn = build_scorer("knn_cos", k=2, knn_backend="torch")
    s = knn.fit(bank).score(extract_features(enc, test, ExtractOptions(8)))
    assert res["auroc"] == pytest.approx(roc_auc_score(labels.numpy(), s), abs=1e-12)
    subset = ScoreOptions(size=8, knn_backend="torch", bank_size=10, seed=4)
    a = score_run(enc, train, test, labels, **kw, options=subset)
    b = score_run(enc, train, test, labels, **kw, options=subset)
    assert a == b


def test_ensemble_bank_of_crops() -> None:
    """ensemble_bank="crops": the ensemble is fitted on n_crops crops of every bank image (drawn
    apart from the test crops, which stay the same); plain and angled do not change."""
    enc = _tiny_conv(in_ch=3)
    train, test = _images(12, seed=1), _images(10, seed=2)
    labels = torch.tensor([0, 1] * 5)
    kw = dict(
        scorers=[("knn_cos", {"k": 2, "knn_backend": "torch"})],
        variants=("plain", "angled", "ensemble"), return_details=True,
    )  # fmt: skip
    opts = ScoreOptions(size=8, n_crops=3, seed=5)
    _, centre = score_run(enc, train, test, labels, **kw, options=opts)
    on_crops = ScoreOptions(size=8, n_crops=3, seed=5, ensemble_bank="crops")
    _, crops = score_run(enc, train, test, labels, **kw, options=on_crops)
    for variant in ("plain", "angled"):
        name = f"knn_cos:k=2,knn_backend=torch ({variant})"
        np.testing.assert_array_equal(crops["scores"][name], centre["scores"][name])
    ens = "knn_cos:k=2,knn_backend=torch (ensemble)"
    assert not np.allclose(crops["scores"][ens], centre["scores"][ens])
    # by hand: test crops from seed + 1 (angle by angle), bank crops from seed + 2
    extractor = FeatureExtractor(enc, 8, 1.125, 3)
    banks = extract_banks(extractor, train, ANGLES, seed=5, crops=3)
    assert all(b.shape[0] == 3 * 12 for b in banks.values())
    gen = torch.Generator().manual_seed(6)
    feats = {a: extractor.extract(test, angle=a, crops=3, gen=gen) for a in ANGLES}
    vs = VariantScorer("knn_cos", {"k": 2, "knn_backend": "torch"}, "ensemble", 3).fit(banks)
    np.testing.assert_allclose(crops["scores"][ens], vs.combine(feats).numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="ensemble_bank"):
        edges = ScoreOptions(size=8, n_crops=3, seed=5, ensemble_bank="edges")
        score_run(enc, train, test, labels, **kw, options=edges)


def test_score_run_errors() -> None:
    imgs = _images(4)
    with pytest.raises(InputError, match="labels"):
        score_run(_Pool(), imgs, imgs, [0, 1, 0], scorers=["centre"], options=ScoreOptions(size=8))
    with pytest.raises(ConfigError, match="variant"):
        score_run(_Pool(), imgs, imgs, [0, 1, 0, 1], scorers=["centre"], variants=("rot",))
    with pytest.raises(ConfigError, match="unknown scorer"):
        score_run(_Pool(), imgs, imgs, [0, 1, 0, 1], ["nope"], options=ScoreOptions(size=8))


def test_kmeans_bank_keeps_the_answer():
    from firmad.metrics import evaluate_scores
    from firmad.scoring import kmeans_centroids

    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(600, 16, generator=gen) * 0.1 + 3.0  # a tight blob
    centroids = kmeans_centroids(bank, 20, seed=0)
    assert centroids.shape == (20, 16)
    assert torch.allclose(centroids.norm(dim=1), bank.norm(dim=1).mean().expand(20), rtol=1e-4)
    normal = torch.randn(200, 16, generator=gen) * 0.1 + 3.0
    far = -normal
    scores = build_scorer("knn_cos", k=1).fit(centroids).score(torch.cat([normal, far]))
    labels = np.r_[np.zeros(200), np.ones(200)]
    assert evaluate_scores(labels, scores)["auroc"] > 0.99


def test_result_labels_are_the_specs_canonical_strings() -> None:
    from firmad.scoring import ScorerSpec, result_identity, row_name

    vs = VariantScorer("knn_cos:k=5.0", None, "plain")
    assert vs.label == "knn_cos:k=5 (plain)" and vs.spec == ScorerSpec.parse("knn_cos")
    row = vs.result_row({"auroc": 0.5})
    assert row["label"] == "knn_cos:k=5" and row["params"] == {"k": 5, "knn_backend": "auto"}
    assert row_name({"scorer": "knn_cos_norm", "k": 5, "variant": "angled"}) == "knn_cos_norm:k=5"
    assert row_name({"scorer": "centre", "k": None, "variant": "plain"}, variant=True) == (
        "centre (plain)"
    )
    assert row_name({"scorer": None}) == "None"  # a cell with no rows
    # rows written before params existed name the same scorer as the new rows
    old = {"scorer": "knn_cos", "k": 5, "variant": "plain"}
    assert result_identity(old) == result_identity(row)
    kde5 = VariantScorer("kde", {"scale": 5}).result_row({})
    kde50 = VariantScorer("kde:scale=50").result_row({})
    assert result_identity(kde5) != result_identity(kde50)
    assert (kde5["label"], kde50["label"]) == ("kde:scale=5", "kde:scale=50")


def test_score_run_numbers_do_not_depend_on_how_a_scorer_is_written() -> None:
    """Old-style (name, params) pairs and canonical spec strings give the same scores, each
    the scorer's own scores on the same features."""
    enc = _tiny_conv(in_ch=3)
    train, test = _images(30, seed=1), _images(20, seed=2)
    labels = torch.tensor([0, 1] * 10)
    pairs = [("knn_cos", {"k": 2}), ("kde", {"scale": 5}), ("kde", {}), ("centre", {})]
    specs = ["knn_cos:k=2", "kde:scale=5.0", "kde", "centre"]
    kw = dict(options=ScoreOptions(size=8), return_details=True)
    rows_a, a = score_run(enc, train, test, labels, pairs, **kw)
    rows_b, b = score_run(enc, train, test, labels, specs, **kw)
    assert rows_a == rows_b and list(a["scores"]) == list(b["scores"])
    bank = extract_features(enc, train, ExtractOptions(8))
    feats = extract_features(enc, test, ExtractOptions(8))
    for (name, params), row in zip(pairs, rows_a, strict=True):
        own = build_scorer(name, **params).fit(bank).score(feats)
        np.testing.assert_array_equal(a["scores"][f"{row['label']} (plain)"], own)
        assert row["auroc"] == roc_auc_score(labels.numpy(), own)
    assert not np.array_equal(a["scores"]["kde:scale=5 (plain)"], a["scores"]["kde (plain)"])
