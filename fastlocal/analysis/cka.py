"""Linear CKA (Kornblith et al., ICML 2019) between representations, full-data and by minibatches.

`linear_cka` is the full-data value on (n, d) features: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
with column-centred features, which equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear
kernels K = X X^T, L = Y Y^T and the centred (biased) HSIC tr(K H L H) / (n-1)^2.

`MinibatchCKA` is the estimator of Nguyen, Raghu and Kornblith (ICLR 2021): over minibatches of the same
images it sums the unbiased HSIC of Song et al. (2012) and returns
CKA = sum HSIC_1(X, Y) / sqrt(sum HSIC_1(X, X) * sum HSIC_1(Y, Y)).
Its memory is one (b, b) Gram matrix per representation for a minibatch of b images, whatever the number
of images; every pair of representations of two models is computed at once from their Gram matrices.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full-data linear CKA of x: (n, d1) and y: (n, d2), in float64."""
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix (b, b), float64, of features (b, ...) flattened per example (products in
    float32, or float64 for float64 features).

    The features are centred over the batch first: the unbiased HSIC does not change (it is invariant to
    adding a constant vector to every example), but the float32 product loses far less to cancellation on
    post-ReLU activations, whose mean is large."""
    flat = features.flatten(1)
    flat = flat if flat.dtype == torch.float64 else flat.float()  # bf16 activations: products in float32
    flat = flat - flat.mean(0)
    return (flat @ flat.T).double()


def unbiased_hsic(grams_x: torch.Tensor, grams_y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of every pair: grams_x (P, n, n), grams_y (Q, n, n) -> (P, Q).

    With K~ the Gram matrix with its diagonal set to 0 and 1 the ones vector:
    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    For symmetric K~, L~: tr(K~ L~) is the dot product of their flattened entries and 1'K~L~1 that of
    their row sums, so all P*Q pairs are two matrix products."""
    n = grams_x.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples per minibatch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=grams_x.device)
    kx = grams_x.double().masked_fill(eye, 0)
    ky = grams_y.double().masked_fill(eye, 0)
    rows_x, rows_y = kx.sum(-1), ky.sum(-1)  # (P, n), (Q, n)
    trace = kx.flatten(1) @ ky.flatten(1).T
    totals = rows_x.sum(-1)[:, None] * rows_y.sum(-1)[None, :]
    return (trace + totals / ((n - 1) * (n - 2)) - 2 / (n - 2) * (rows_x @ rows_y.T)) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA of P representations of one model against Q of another, accumulated over minibatches
    (Nguyen et al. 2021). Call `update` with the Gram matrices of the same images for both, then `value`."""

    def __init__(self, num_x: int, num_y: int, device: torch.device | str = "cpu"):
        self.cross = torch.zeros(num_x, num_y, dtype=torch.float64, device=device)
        self.self_x = torch.zeros(num_x, dtype=torch.float64, device=device)
        self.self_y = torch.zeros(num_y, dtype=torch.float64, device=device)
        self.num_batches = 0

    def update(self, grams_x: torch.Tensor, grams_y: torch.Tensor) -> None:
        """grams_x: (P, b, b), grams_y: (Q, b, b), from `gram_matrix` of the same b images."""
        self.cross += unbiased_hsic(grams_x, grams_y)
        self.self_x += unbiased_hsic_diagonal(grams_x)
        self.self_y += unbiased_hsic_diagonal(grams_y)
        self.num_batches += 1

    def value(self) -> torch.Tensor:
        """(P, Q) CKA of every pair, float64."""
        if self.num_batches == 0:
            raise ValueError("MinibatchCKA.value() before any update()")
        return self.cross / torch.sqrt(self.self_x[:, None] * self.self_y[None, :])


def unbiased_hsic_diagonal(grams: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K_p, K_p) of each of grams (P, n, n) -> (P,)."""
    return torch.stack([unbiased_hsic(g[None], g[None])[0, 0] for g in grams])


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The minibatch estimator for one pair x: (n, ...), y: (n, ...), batches in order (a last batch of
    fewer than 4 examples is left out)."""
    cka = MinibatchCKA(1, 1, x.device)
    for start in range(0, x.shape[0] - 3, batch_size):
        batch = slice(start, start + batch_size)
        cka.update(gram_matrix(x[batch])[None], gram_matrix(y[batch])[None])
    return float(cka.value()[0, 0])
