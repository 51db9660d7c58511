"""Evaluation on any image folder: the Frechet distance and its matrix square root against closed
forms, KID's unbiasedness and standard error, the feature net's determinism and cache, caption
adherence against chance, and `python -m sampling.evaluate --real-dir/--fake-dir/--data-dir`."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from image_sets import QUADRANTS, BlobDataset, blob_images, write_folder

import sampling.evaluate as evaluate_script
import sampling.features as features_module
from diffusion import AdvancedDiffusionTrainer
from nets import AdvancedUNet
from sampling import AdvancedDiffusionPipeline, RealReference, evaluate_pipeline
from sampling.features import (
    FeatureNetSettings,
    cache_key,
    class_like_captions,
    default_cache_dir,
    extract_features,
    load_or_train,
    train_feature_net,
)
from sampling.metrics import (
    frechet_distance,
    frechet_distance_features,
    gaussian_statistics,
    kernel_inception_distance,
    polynomial_kernel,
    sqrtm_psd,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: no thread-pool stalls


def gaussian(n, mean, covariance, seed):
    """(n, D) float64 samples of N(mean, covariance)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    root = torch.linalg.cholesky(torch.as_tensor(covariance, dtype=torch.float64))
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ root.T + mean


def random_rotation(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# ---- Frechet distance and the PSD square root ----

def test_fd_of_a_feature_set_to_itself_is_zero():
    x = gaussian(300, [1.0, -2.0, 0.5], [[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], 0)
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    mu, sigma = gaussian_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_features(x, x + 0.1) == pytest.approx(3 * 0.01, rel=1e-9)


def test_fd_matches_the_closed_form_of_diagonal_gaussians():
    """Diagonal: sum(s1 + s2 - 2 sqrt(s1 s2)) + ||mu1 - mu2||^2; the same after rotating both
    Gaussians by one orthogonal Q (FD is rotation invariant), where the matrices are full."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, -1.0]), torch.tensor([0.5, 1.0, 0.0, 3.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    exact = float((s1 + s2 - 2 * (s1 * s2).sqrt()).sum() + (mu1 - mu2).square().sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == \
        pytest.approx(exact, rel=1e-12)
    q = random_rotation(4, 1)
    rotated = frechet_distance(q @ mu1.double(), q @ torch.diag(s1).double() @ q.T,
                               q @ mu2.double(), q @ torch.diag(s2).double() @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-10)


def test_fd_matches_the_closed_form_of_non_commuting_covariances():
    """For 2x2 PSD M, tr(M^(1/2)) = sqrt(tr M + 2 sqrt(det M)); with M = S1^(1/2) S2 S1^(1/2):
    tr M = tr(S1 S2), det M = det S1 det S2. The covariances do not commute, so a trace of
    sqrt(S1) sqrt(S2) (right only for commuting ones) fails here."""
    s1 = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.4], [-0.4, 3.0]], dtype=torch.float64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    cross = math.sqrt(float((s1 @ s2).trace()) + 2 * math.sqrt(float(s1.det() * s2.det())))
    exact = float(s1.trace() + s2.trace()) - 2 * cross + 0.5**2
    mu1, mu2 = torch.zeros(2), torch.tensor([0.5, 0.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    wrong = float(s1.trace() + s2.trace() - 2 * (sqrtm_psd(s1) @ sqrtm_psd(s2)).trace()) + 0.25
    assert abs(wrong - exact) > 1e-3


def test_sample_fd_converges_to_the_closed_form():
    mu1, mu2 = [0.0, 0.0, 0.0], [1.0, 0.0, -0.5]
    c1 = [[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]]
    c2 = [[0.5, 0.0, 0.1], [0.0, 1.0, 0.0], [0.1, 0.0, 3.0]]
    exact = frechet_distance(torch.tensor(mu1), torch.tensor(c1), torch.tensor(mu2),
                             torch.tensor(c2))
    errors = {n: np.mean([abs(frechet_distance_features(gaussian(n, mu1, c1, 2 * s),
                                                        gaussian(n, mu2, c2, 2 * s + 1)) - exact)
                          for s in range(4)])
              for n in (50, 500, 50000)}
    assert errors[50000] < 0.01 * exact
    assert errors[50000] < errors[500] < errors[50]


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_sqrtm_squares_back_to_the_matrix(d, rank, seed):
    """sqrtm(A) @ sqrtm(A) == A for PSD A of any rank; the root is symmetric and PSD."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, min(rank, d), generator=g, dtype=torch.float64)
    a = b @ b.T
    root = sqrtm_psd(a)
    assert torch.isfinite(root).all()
    assert torch.allclose(root, root.T)
    assert torch.allclose(root @ root, a, atol=1e-9 * max(1.0, float(a.abs().max())))
    assert torch.linalg.eigvalsh(root).min() > -1e-7


def test_singular_and_near_singular_covariances_give_finite_results():
    """Zero, rank-deficient and near-singular covariances (eigenvalues 1e-12, and -1e-15 as
    rounding leaves them): a square root without clipping would take sqrt of a negative (NaN)."""
    q = random_rotation(6, 3)
    w = torch.tensor([4.0, 1.0, 1e-6, 1e-12, -1e-15, -3e-16], dtype=torch.float64)
    near = q @ torch.diag(w) @ q.T
    assert torch.isnan(torch.linalg.eigvalsh(near).sqrt()).any()  # the naive root
    rank2 = torch.randn(6, 2, dtype=torch.float64)
    for matrix in (near, torch.zeros(6, 6, dtype=torch.float64), rank2 @ rank2.T):
        root = sqrtm_psd(matrix)
        assert torch.isfinite(root).all()
        assert torch.allclose(root @ root, matrix, atol=1e-7)
        for other in (near, torch.eye(6, dtype=torch.float64), rank2 @ rank2.T):
            value = frechet_distance(torch.zeros(6), matrix, torch.ones(6), other)
            assert math.isfinite(value) and value >= 0
    # identical singular Gaussians are at distance 0
    assert frechet_distance(torch.zeros(6), near, torch.zeros(6), near) == \
        pytest.approx(0.0, abs=1e-6)


def test_fd_with_fewer_samples_than_dimensions_is_finite():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g)
    value = frechet_distance_features(a, b)
    assert math.isfinite(value) and value > 0
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-8)
    constant = torch.ones(10, 64)  # zero covariance
    assert math.isfinite(frechet_distance_features(constant, b))


# ---- KID ----

def population_mmd2(sample_x, sample_y, n=400_000):
    """E k(x, x') + E k(y, y') - 2 E k(x, y) from n independent pairs of each kind."""
    x1, x2, y1, y2 = sample_x(n, 10), sample_x(n, 11), sample_y(n, 12), sample_y(n, 13)

    def paired(a, b):
        return ((a * b).sum(dim=1) / a.shape[1] + 1) ** 3

    return float(paired(x1, x2).mean() + paired(y1, y2).mean() - 2 * paired(x1, y1).mean())


def test_kid_is_unbiased_against_the_population_value():
    """The mean of KID over many draws of 40 samples matches the population MMD^2; the biased
    estimate (the V-statistic, diagonals included) on the same draws does not."""
    d = 4

    def sample_x(n, seed):
        return gaussian(n, [0.0] * d, torch.eye(d), seed)

    def sample_y(n, seed):
        return gaussian(n, [0.3] * d, 0.8 * torch.eye(d), seed)

    population = population_mmd2(sample_x, sample_y)
    kids, biased = [], []
    for draw in range(300):
        x, y = sample_x(40, 100 + 2 * draw), sample_y(40, 101 + 2 * draw)
        kids.append(kernel_inception_distance(x, y, num_partitions=2, seed=draw)[0])
        biased.append(float(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                            - 2 * polynomial_kernel(x, y).mean()))
    tolerance = 3 * np.std(kids) / math.sqrt(len(kids)) + 0.01 * population
    assert population > 0.1
    assert abs(np.mean(kids) - population) < tolerance
    assert abs(np.mean(biased) - population) > 3 * tolerance


def test_kid_of_identical_distributions_is_zero_within_its_standard_error():
    kids, stds = [], []
    for draw in range(100):
        x = gaussian(200, [0.0] * 4, torch.eye(4), 2 * draw)
        y = gaussian(150, [0.0] * 4, torch.eye(4), 2 * draw + 1)
        kid, kid_std = kernel_inception_distance(x, y, seed=draw)
        kids.append(kid)
        stds.append(kid_std)
        assert abs(kid) < 5 * kid_std
    assert abs(np.mean(kids)) < 3 * np.sqrt(np.mean(np.square(stds)) / len(kids))


@pytest.mark.parametrize("num_partitions, shift", [(1, 0.3), (10, 0.3), (10, 0.0)])
def test_kid_std_is_a_standard_error(num_partitions, shift):
    """Over independent draws of the two sets, kid's spread matches kid_std (exactly so for one
    partition; for several, the moment estimate is right where the distributions differ and
    may only be larger where they are alike). A kid_std that were the spread of the single
    subsets (no / sqrt(K)) would be ~3x too large."""
    kids, variances = [], []
    for draw in range(150):
        x = gaussian(200, [0.0] * 4, torch.eye(4), 2 * draw)
        y = gaussian(200, [shift] * 4, torch.eye(4), 2 * draw + 1)
        kid, kid_std = kernel_inception_distance(x, y, num_partitions=num_partitions,
                                                 seed=draw)
        kids.append(kid)
        variances.append(kid_std**2)
    ratio = math.sqrt(np.mean(variances)) / np.std(kids, ddof=1)
    if shift:
        assert 0.75 < ratio < 1.35, ratio
    else:
        assert 0.9 < ratio < 2.0, ratio


def test_bad_metric_arguments_name_the_argument():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="features_b has D=4"):
        frechet_distance_features(x, torch.randn(10, 4))
    with pytest.raises(ValueError, match="features_a has 3 samples; need at least 4"):
        kernel_inception_distance(x[:3], x)
    with pytest.raises(ValueError, match="features_a contains NaN"):
        frechet_distance_features(torch.full((4, 3), math.nan), x)
    with pytest.raises(ValueError, match="num_partitions=0"):
        kernel_inception_distance(x, x, num_partitions=0)
    with pytest.raises(ValueError, match=r"sigma2 must be a square"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.ones(3, 2))


# ---- The feature net and its cache ----

def tiny_settings(objective="contrastive", **overrides):
    classes = 4 if objective == "classifier" else 0
    fields = dict(channels=1, image_size=8, num_classes=classes, epochs=1, width=8,
                  feature_dim=16, batch_size=16)
    return FeatureNetSettings(objective=objective, **{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_data():
    images, captions = blob_images(40, 1, size=8)
    return images, torch.tensor([i % 4 for i in range(40)]), sorted(set(captions))


@pytest.mark.parametrize("objective", ["classifier", "contrastive"])
def test_feature_net_is_deterministic_for_a_seed(objective, tiny_data):
    """Same seed: the same weights and features; another seed: others. The global RNG is left
    as it was (a training loop calling the evaluation keeps its random stream)."""
    images, labels, _ = tiny_data
    labels = labels if objective == "classifier" else None
    state = torch.get_rng_state()
    nets = [train_feature_net(images, labels, tiny_settings(objective, seed=s))
            for s in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    same = [extract_features(net, images) for net in nets]
    assert same[0].shape == (40, 16) and same[0].dtype == torch.float64
    assert torch.equal(same[0], same[1])
    assert not torch.allclose(same[0], same[2])
    for name, value in nets[0].state_dict().items():
        assert torch.equal(value, nets[1].state_dict()[name]), name


def test_class_like_captions():
    assert class_like_captions(["b", "a", "b", "a", "a", "b"]) == ["a", "b"]
    assert class_like_captions(["a", "b"] * 5 + ["c"]) is None  # one caption on one image
    assert class_like_captions(["a"] * 10) is None  # one class
    assert class_like_captions(["a", "b"] * 5 + [""] * 3) is None  # uncaptioned images
    assert class_like_captions([f"free text {i}" for i in range(50)]) is None


def test_cache_loads_without_training_and_keys_follow_the_content(tiny_data, tmp_path,
                                                                   monkeypatch):
    images, _, _ = tiny_data
    settings = tiny_settings()
    with torch.no_grad():  # as evaluate_pipeline calls it: training turns gradients on
        net, info = load_or_train(images, None, None, settings, tmp_path)
    assert info["cached"] is False and info["train_seconds"] > 0
    state = torch.load(info["path"], weights_only=True)
    assert state["key"] == info["key"] == cache_key(images, None, None, settings)
    monkeypatch.setattr(features_module, "train_feature_net",
                        lambda *a: pytest.fail("trained although the cache holds the net"))
    again, info2 = load_or_train(images, None, None, settings, tmp_path)
    assert info2["cached"] is True and info2["path"] == info["path"]
    assert torch.equal(extract_features(net, images), extract_features(again, images))
    changed = images.clone()
    changed[3, 0, 2, 2] += 0.01
    keys = {cache_key(images, None, None, settings), cache_key(changed, None, None, settings),
            cache_key(images, None, None, tiny_settings(seed=1)),
            cache_key(images, None, None, tiny_settings(epochs=2)),
            cache_key(images, None, None, tiny_settings(width=4)),
            cache_key(images[:, :, :, :7], None, None, settings)}
    assert len(keys) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another key"])
def test_a_damaged_cache_file_is_retrained_with_a_warning(damage, tiny_data, tmp_path):
    images, _, _ = tiny_data
    settings = tiny_settings()
    _, info = load_or_train(images, None, None, settings, tmp_path)
    path = tmp_path / f"{info['key']}.pt"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        other = tiny_settings(seed=5)
        _, info_other = load_or_train(images, None, None, other, tmp_path)
        path.write_bytes((tmp_path / f"{info_other['key']}.pt").read_bytes())
    with pytest.warns(UserWarning, match="cannot be used.*training the net again"):
        _, retrained = load_or_train(images, None, None, settings, tmp_path)
    assert retrained["cached"] is False
    assert torch.load(path, weights_only=True)["key"] == info["key"]  # repaired
    assert load_or_train(images, None, None, settings, tmp_path)[1]["cached"] is True


def test_an_unwritable_cache_folder_only_warns(tiny_data, tmp_path):
    images, _, _ = tiny_data
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the feature net cache"):
        net, info = load_or_train(images, None, None, tiny_settings(), blocker / "cache")
    assert info["cached"] is False and net is not None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "advanced-diffusion" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "advanced-diffusion" / "features"


# ---- Real reference, adherence, evaluate_pipeline ----

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def reference(cache):
    return RealReference.build(BlobDataset(200), cache_dir=cache)


def test_adherence_is_high_on_real_held_out_images_and_at_chance_for_shuffled_prompts(
        reference):
    assert reference.settings.objective == "classifier" and len(reference.classes) == 4
    assert reference.real_adherence >= 0.95
    images, prompts = blob_images(200, seed=7)  # new images from the same source
    result = reference.score(images, prompts)
    assert result["adherence"] >= 0.95 and result["adherence_images"] == 200
    assert result["chance"] == pytest.approx(0.25)
    shuffled = reference.score(images, prompts, shuffle_prompts=True)
    assert abs(shuffled["adherence"] - shuffled["chance"]) < 3 * math.sqrt(0.25 * 0.75 / 200)
    wrong = [f"a blob at {QUADRANTS[(QUADRANTS.index(p[10:]) + 1) % 4]}" for p in prompts]
    assert reference.score(images, wrong)["adherence"] < 0.1
    assert reference.score(images, ["free text"] * 200)["adherence"] is None


def test_fd_and_kid_separate_new_real_images_from_a_collapsed_set(reference):
    images, prompts = blob_images(120, seed=8)
    fresh = reference.score(images, prompts)
    collapsed = reference.score(images[:1].expand(120, -1, -1, -1), prompts)
    assert fresh["fd"] < 3 * fresh["fd_floor"]
    assert collapsed["fd"] > 10 * max(fresh["fd"], fresh["fd_floor"])
    assert collapsed["kid"] > 4 * collapsed["kid_std"]
    assert collapsed["kid"] > fresh["kid"] + 5 * fresh["kid_std"]
    for key in ("fd", "kid", "kid_std", "adherence", "chance", "fd_floor", "kid_floor",
                "real_adherence", "num_real", "num_fake", "feature_net"):
        assert key in fresh


def test_evaluate_pipeline(cache, monkeypatch):
    """The keys of the JSON line; the same result twice; the real images read once per
    dataset object; the global RNG and the modules' modes left alone."""
    config = tiny_config(in_channels=1, out_channels=1, num_inference_steps=2)
    pipeline = AdvancedDiffusionPipeline(config)
    pipeline.unet.train()
    dataset = BlobDataset(200)
    state = torch.get_rng_state()
    first = evaluate_pipeline(pipeline, dataset, num_images=8, cache_dir=cache)
    assert torch.equal(torch.get_rng_state(), state) and pipeline.unet.training
    assert first["feature_net"]["cached"] is True  # the reference fixture trained this net
    monkeypatch.setattr(RealReference, "build",
                        classmethod(lambda *a, **k: pytest.fail("built the reference again")))
    second = evaluate_pipeline(pipeline, dataset, num_images=8, cache_dir=cache)
    for key in ("fd", "kid", "kid_std", "adherence", "chance", "fd_floor", "kid_floor"):
        assert first[key] == second[key], key
    assert first["num_fake"] == 8 and first["adherence_images"] == 8
    assert 0 <= first["adherence"] <= 1 and first["num_real_floor"] == 8  # floor at 8 too
    assert math.isfinite(first["fd"]) and math.isfinite(first["kid_std"])
    with pytest.raises(ValueError, match="num_images=2 must be an int >= 4"):
        evaluate_pipeline(pipeline, dataset, num_images=2, cache_dir=cache)
    rgb = AdvancedDiffusionPipeline(tiny_config())
    with pytest.raises(ValueError, match="in_channels=3 images but the real images have 1"):
        evaluate_pipeline(rgb, dataset, num_images=8, cache_dir=cache)


# ---- python -m sampling.evaluate ----

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    real = write_folder(root / "real", *blob_images(80, seed=0))
    fake = write_folder(root / "fake", *blob_images(16, seed=9))
    uncaptioned = write_folder(root / "uncaptioned", blob_images(16, seed=10)[0])
    return real, fake, uncaptioned


def run_main(capsys, *args):
    """main(args) (keep_freed_memory patched out by the caller): (stdout lines, JSON line)."""
    assert evaluate_script.main([str(a) for a in args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_cli_compares_two_folders(folders, cache, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_script, "keep_freed_memory", lambda: True)
    real, fake, uncaptioned = folders
    lines, summary = run_main(capsys, "--real-dir", real, "--fake-dir", fake, "--cache-dir",
                              cache)
    assert lines[0].split() == ["metric", "measured", "floor"]
    assert [line.split()[0] for line in lines[1:5]] == ["fd", "kid", "kid_std", "adherence"]
    for key in ("fd", "kid", "kid_std", "adherence", "chance", "fd_floor", "kid_floor",
                "real_adherence", "num_real", "num_fake", "feature_net", "seconds"):
        assert key in summary, key
    assert summary["num_fake"] == 16 and summary["feature_net"]["image_size"] == 16
    assert summary["feature_net"]["channels"] == 1 and summary["chance"] == 0.25
    assert summary["adherence"] >= 0.75
    _, bare = run_main(capsys, "--real-dir", real, "--fake-dir", uncaptioned, "--cache-dir",
                       cache)
    assert bare["adherence"] is None and bare["chance"] is None
    assert bare["feature_net"]["cached"] is True  # the same real folder: the same net


def test_cli_samples_a_checkpoint_against_a_folder(folders, cache, capsys, monkeypatch,
                                                   tmp_path):
    monkeypatch.setattr(evaluate_script, "keep_freed_memory", lambda: True)
    real, _, _ = folders
    config = tiny_config(in_channels=1, out_channels=1, dataset="folder", data_dir=str(real))
    path = AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(
        tmp_path / "grey.pt")
    _, summary = run_main(capsys, "--checkpoint", path, "--data-dir", real, "--num-images", 8,
                          "--steps", 2, "--cache-dir", cache, "--device", "cpu")
    assert summary["num_fake"] == 8 and summary["num_inference_steps"] == 2
    assert summary["feature_net"]["cached"] is True and summary["adherence"] is not None


@pytest.mark.parametrize("args, message", [
    ([], "give --checkpoint C"),
    (["--fake-dir", "{fake}"], "--fake-dir needs --real-dir"),
    (["--real-dir", "{real}"], "--real-dir needs --fake-dir"),
    (["--data-dir", "{real}"], "--data-dir needs --checkpoint"),
    (["--real-dir", "{missing}", "--fake-dir", "{fake}"], "--real-dir '{missing}' is not a "
                                                          "folder"),
    (["--real-dir", "{real}", "--fake-dir", "{missing}"], "--fake-dir '{missing}' is not a "
                                                          "folder"),
    (["--checkpoint", "c.pt", "--data-dir", "{missing}"], "--data-dir '{missing}' is not a "
                                                          "folder"),
    (["--checkpoint", "c.pt", "--real-dir", "{real}", "--fake-dir", "{x}"], "take no --checkpoint"),
    (["--real-dir", "{real}", "--fake-dir", "{fake}", "--steps", "2"],
     "--steps does not apply here (folders evaluation)"),
    (["--real-dir", "{real}", "--fake-dir", "{fake}", "--num-images", "5"],
     "--num-images does not apply here"),
    (["--checkpoint", "c.pt", "--seed", "0"], "--seed does not apply here (shapes evaluation)"),
    (["--checkpoint", "c.pt", "--data-dir", "{real}", "--grid", "g.png"],
     "--grid does not apply here (checkpoint evaluation)"),
    (["--real-dir", "{few}", "--fake-dir", "{fake}"], "the real dataset has 5 images; need at "
                                                      "least 16"),
])
def test_cli_bad_arguments_are_one_line_errors(args, message, folders, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_script, "keep_freed_memory", lambda: True)
    real, fake, _ = folders
    few = write_folder(tmp_path / "few", *blob_images(5, seed=3))
    names = {"real": real, "fake": fake, "x": fake, "missing": tmp_path / "missing", "few": few}
    with pytest.raises(SystemExit) as info:
        evaluate_script.main([a.format(**names) for a in args])
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert info.value.code.startswith("evaluate: ")
    assert message.format(**names) in info.value.code


def test_cli_argparse_errors_name_the_flag(folders, capsys):
    real, fake, _ = folders
    with pytest.raises(SystemExit):
        evaluate_script.main(["--real-dir", str(real), "--fake-dir", str(fake),
                              "--image-size", "0"])
    assert "--image-size: 0 must be a positive integer" in capsys.readouterr().err
