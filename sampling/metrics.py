"""Distances between two sets of image features, all in float64: the Frechet distance, the
kernel inception distance (KID) and caption-classifier accuracy (prompt adherence).

Features are (N, D) tensors (any float dtype; converted to float64), e.g. the penultimate layer
of the feature network of sampling/features.py. The sets may differ in size.

- Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule"): between
  the Gaussians N(mu1, S1) and N(mu2, S2) fitted to the two sets,
  FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2)).
  The square roots are of symmetric PSD matrices, taken by a symmetric eigendecomposition with
  negative eigenvalues (rounding) clipped to 0, so singular covariances (fewer samples than
  dimensions, constant features) give finite values, never NaN.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of MMD^2 with
  the polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over subsets. The subsets come in
  partitions: each partition splits a random order of each set into disjoint subsets of
  `subset_size`, so the subsets of one partition are independent estimates and their spread
  gives a standard error; several partitions are averaged to lower the variance further, and
  the spread between partitions says by how much (`kernel_inception_distance`).
"""

import math

import torch

KID_KERNEL_DEGREE = 3  # k(x, y) = (x.y / D + KID_KERNEL_COEF0)^3, Binkowski et al. 2018
KID_KERNEL_COEF0 = 1.0
DEFAULT_KID_SUBSET_SIZE = 1000  # the usual subset size; smaller sets get smaller subsets
TARGET_KID_SUBSETS = 10  # subsets per partition wanted for the standard error
DEFAULT_KID_PARTITIONS = 10  # partitions averaged
MIN_KID_SUBSET_SIZE = 2  # the unbiased estimate divides by m (m - 1)
MIN_FEATURE_SAMPLES = 2  # a covariance needs two samples


def _as_features(features, name: str) -> torch.Tensor:
    """(N, D) float64 on the CPU; ValueError naming `name` for anything else."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be an (N, D) torch.Tensor; got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be (N, D) features; got shape {tuple(features.shape)}")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return features


def _check_pair(a: torch.Tensor, b: torch.Tensor, minimum: int) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has D={a.shape[1]} but features_b has D={b.shape[1]}; "
                         "both sets need the same feature dimension")
    for name, x in (("features_a", a), ("features_b", b)):
        if x.shape[0] < minimum:
            raise ValueError(f"{name} has {x.shape[0]} samples; need at least {minimum}")


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------

def gaussian_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) (divided by N - 1) of (N, D) features, float64;
    N >= 2."""
    x = _as_features(features, "features")
    if x.shape[0] < MIN_FEATURE_SAMPLES:
        raise ValueError(f"features has {x.shape[0]} samples; need at least "
                         f"{MIN_FEATURE_SAMPLES} for a covariance")
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _check_square(matrix, name: str) -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 \
            or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"{name} must be a square (D, D) tensor; got {shape}")
    matrix = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return (matrix + matrix.T) / 2  # symmetric up to rounding -> exactly symmetric


def psd_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (D,) of a symmetric PSD matrix, float64, the negative ones (rounding) set to
    0."""
    return torch.linalg.eigvalsh(_check_square(matrix, "matrix")).clamp_min(0.0)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric positive semi-definite (D, D) matrix, float64:
    A = V diag(w) V^T -> V diag(sqrt(max(w, 0))) V^T. Singular and rank-deficient matrices are
    fine; eigenvalues that rounding made slightly negative count as 0 (no NaN)."""
    eigenvalues, vectors = torch.linalg.eigh(_check_square(matrix, "matrix"))
    root = vectors * eigenvalues.clamp_min(0.0).sqrt()  # V diag(sqrt(w)), column-scaled
    root = root @ vectors.T
    return (root + root.T) / 2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2)), float64.

    mu: (D,); sigma: (D, D) symmetric PSD. The last trace is the sum of the square roots of the
    (clipped) eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2), which equals
    tr((S1 S2)^(1/2)). Rounding can take the exact 0 of identical Gaussians a hair below 0;
    the result is clipped at 0."""
    mu1 = torch.as_tensor(mu1).detach().to("cpu", torch.float64).reshape(-1)
    mu2 = torch.as_tensor(mu2).detach().to("cpu", torch.float64).reshape(-1)
    sigma1, sigma2 = _check_square(sigma1, "sigma1"), _check_square(sigma2, "sigma2")
    if not (mu1.shape[0] == mu2.shape[0] == sigma1.shape[0] == sigma2.shape[0]):
        raise ValueError(f"mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 "
                         f"{tuple(mu2.shape)} and sigma2 {tuple(sigma2.shape)} must share D")
    root1 = sqrtm_psd(sigma1)
    cross = psd_eigenvalues(root1 @ sigma2 @ root1).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(float(distance), 0.0)


def frechet_distance_features(features_a, features_b) -> float:
    """The Frechet distance between Gaussians fitted to (N1, D) and (N2, D) feature sets."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    _check_pair(a, b, MIN_FEATURE_SAMPLES)
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------

def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / D + 1)^3 for (N, D) and (M, D) -> (N, M), KID's kernel."""
    return (x @ y.T / x.shape[1] + KID_KERNEL_COEF0) ** KID_KERNEL_DEGREE


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 between (m, D) and (n, D) samples, m, n >= 2:
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n). Its expectation is MMD^2 exactly (it can be < 0)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kid_subset_size(num_a: int, num_b: int, subset_size: int = DEFAULT_KID_SUBSET_SIZE) -> int:
    """The subset size used for sets of num_a and num_b samples: `subset_size`, made smaller
    where needed so that each partition holds TARGET_KID_SUBSETS subsets, but >= 2."""
    return max(MIN_KID_SUBSET_SIZE,
               min(subset_size, min(num_a, num_b) // TARGET_KID_SUBSETS))


def kernel_inception_distance(features_a, features_b, *,
                              subset_size: int = DEFAULT_KID_SUBSET_SIZE,
                              num_partitions: int = DEFAULT_KID_PARTITIONS,
                              seed: int = 0) -> tuple[float, float]:
    """KID between (N1, D) and (N2, D) features: (kid, kid_std), float64.

    Each of P = `num_partitions` partitions shuffles both sets (a generator seeded `seed`) and
    cuts them into K = min(N1, N2) // m disjoint pairs of subsets of m = `kid_subset_size(...)`
    samples; every pair gives an unbiased MMD^2 estimate (`mmd2_unbiased`). kid is the mean of
    all K x P estimates, so it is unbiased. kid_std is its standard error, the square root of a
    moment estimate of its variance: within a partition the subsets are disjoint, hence
    independent, so V / K (V: the within-partition variance of the estimates, pooled) estimates
    the variance of one partition's mean M_p without bias; the partitions share the data, and
    Var(mean of P) = V / K - (1 - 1 / P) E[S_b^2] with S_b^2 the variance between the M_p. The
    estimate is clipped below at V / (K P) (the partitions' correlation is >= 0), which makes
    it conservative where the sets are alike (KID near 0) and small; for one partition it is
    exactly V / K. Needs N1, N2 >= 4, so that K >= 2.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    minimum = 2 * MIN_KID_SUBSET_SIZE
    _check_pair(a, b, minimum)
    if not isinstance(subset_size, int) or subset_size < MIN_KID_SUBSET_SIZE:
        raise ValueError(f"subset_size={subset_size!r} must be an int >= {MIN_KID_SUBSET_SIZE}")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions!r} must be an int >= 1")
    m = kid_subset_size(a.shape[0], b.shape[0], subset_size)
    k = min(a.shape[0], b.shape[0]) // m
    generator = torch.Generator().manual_seed(seed)
    estimates = torch.empty(num_partitions, k, dtype=torch.float64)
    for p in range(num_partitions):
        order_a = torch.randperm(a.shape[0], generator=generator)
        order_b = torch.randperm(b.shape[0], generator=generator)
        for s in range(k):
            estimates[p, s] = mmd2_unbiased(a[order_a[s * m:(s + 1) * m]],
                                            b[order_b[s * m:(s + 1) * m]])
    kid = float(estimates.mean())
    means = estimates.mean(dim=1)  # (P,) the partitions' means M_p
    within = float((estimates - means[:, None]).square().sum()) / (num_partitions * (k - 1))
    one_partition = within / k
    between = float(means.var()) if num_partitions > 1 else 0.0
    variance = max(one_partition - (1 - 1 / num_partitions) * between,
                   one_partition / num_partitions)
    return kid, math.sqrt(variance)


# ---------------------------------------------------------------------------------------------
# Caption adherence
# ---------------------------------------------------------------------------------------------

def classifier_accuracy(predicted, target) -> float:
    """The share of positions where two (N,) integer label tensors agree, N >= 1."""
    predicted, target = torch.as_tensor(predicted), torch.as_tensor(target)
    if predicted.shape != target.shape or predicted.dim() != 1 or predicted.numel() == 0:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target "
                         f"{tuple(target.shape)} must be the same non-empty (N,) shape")
    return float((predicted == target).double().mean())


def chance_accuracy(target) -> float:
    """The best accuracy of a guess that does not look at the image: the share of the most
    frequent label among (N,) integer labels (1 / K for K balanced classes)."""
    target = torch.as_tensor(target)
    if target.dim() != 1 or target.numel() == 0:
        raise ValueError(f"target must be a non-empty (N,) label tensor; got shape "
                         f"{tuple(target.shape)}")
    return float(torch.bincount(target).max()) / target.numel()
