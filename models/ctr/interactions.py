"""Feature interactions of the CTR models beside DLRM, each with its definition written as plain loops
(the tests compare them on random inputs).

Shape vocabulary: B batch, N vectors (fields: the dense vector x and the F embeddings), D width.

* :class:`FactorizationMachine`: the second-order term of an FM over N vectors, sum_{i<j} <v_i, v_j>, in
  O(N D) by the sum-square identity. TorchRec's ``torchrec.modules.deepfm.FactorizationMachine`` is not
  reused: it flattens its input to (B, N D) and applies the identity over all N D elements, which adds
  the products of different coordinates (v_{i,d} v_{j,d'}, d != d') and of a vector's own coordinates,
  i.e. it is not Rendle's FM (the unit tests show the difference).
* :class:`CompressedInteractionNetwork`: xDeepFM's CIN (Lian et al. 2018, arXiv 1803.05170).
* the cross networks of DCN v1 / v2 are TorchRec's (``models.dlrm.DCNInteraction``); their definitions
  as loops are :func:`cross_v1_reference` and :func:`cross_v2_reference`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "CompressedInteractionNetwork",
    "FactorizationMachine",
    "cin_reference",
    "cross_v1_reference",
    "cross_v2_reference",
    "fm_reference",
]


class FactorizationMachine(nn.Module):
    """FM second order: (B, N, D) -> (B,) = sum_{i<j} <v_i, v_j> = 1/2 sum_d [(sum_i v_id)^2 - sum_i v_id^2]."""

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        square_of_sum = vectors.sum(dim=1).square()  # (B, D)
        sum_of_squares = vectors.square().sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)  # (B,)


def fm_reference(vectors: torch.Tensor) -> torch.Tensor:
    """The FM's second-order term as the loop over pairs: (B, N, D) -> (B,)."""
    n = vectors.shape[1]
    total = torch.zeros(vectors.shape[0], dtype=vectors.dtype)
    for i in range(n):
        for j in range(i + 1, n):
            total = total + (vectors[:, i] * vectors[:, j]).sum(dim=1)
    return total


class CompressedInteractionNetwork(nn.Module):
    """xDeepFM's CIN: (B, N, D) -> (B, sum_k H_k), the sum-pooled feature maps of every layer.

    Layer k forms the feature maps X^k (B, H_k, D) from the previous layer's X^{k-1} (B, H_{k-1}, D) and
    the input X^0 (B, N, D), vector-wise (element by element along D):

        X^k_h = sum_{i < H_{k-1}} sum_{j < N} W^k_{h,i,j} (X^{k-1}_i * X^0_j)

    so layer k holds interactions of order k+1. Each map is summed over D (sum pooling) and all layers'
    pooled maps are concatenated (the paper's direct connections, without its split-half option).
    ``weights[k]`` is W^k (H_k, H_{k-1} N).
    """

    def __init__(self, num_fields: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.num_fields = num_fields
        sizes = [num_fields, *layer_sizes]
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(h, previous * num_fields)))
            for previous, h in zip(sizes, sizes[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(h, 1)) for h in layer_sizes)

    @property
    def output_width(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        batch, _, dim = fields.shape
        previous, pooled = fields, []
        for weight, bias in zip(self.weights, self.biases):
            outer = previous.unsqueeze(2) * fields.unsqueeze(1)  # (B, H_{k-1}, N, D)
            previous = torch.matmul(weight, outer.reshape(batch, -1, dim)) + bias  # (B, H_k, D)
            pooled.append(previous.sum(dim=2))  # (B, H_k)
        return torch.cat(pooled, dim=1)  # (B, sum_k H_k)


def cin_reference(
    fields: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]
) -> torch.Tensor:
    """The CIN as loops over feature maps h, previous maps i and fields j: (B, N, D) -> (B, sum_k H_k)."""
    num_fields = fields.shape[1]
    previous, pooled = [fields[:, j] for j in range(num_fields)], []
    for weight, bias in zip(weights, biases):
        maps = []
        for h in range(weight.shape[0]):
            feature_map = torch.zeros_like(fields[:, 0]) + bias[h, 0]  # (B, D)
            for i in range(len(previous)):
                for j in range(num_fields):
                    feature_map = feature_map + weight[h, i * num_fields + j] * previous[i] * fields[:, j]
            maps.append(feature_map)
        previous = maps
        pooled += [feature_map.sum(dim=1, keepdim=True) for feature_map in maps]
    return torch.cat(pooled, dim=1)


def cross_v1_reference(
    x0: torch.Tensor, kernels: list[torch.Tensor], biases: list[torch.Tensor]
) -> torch.Tensor:
    """DCN v1 (Wang et al. 2017, eq. 3), x_{l+1} = x_0 x_l^T w_l + b_l + x_l, sample by sample and element
    by element: x0 (B, N), kernels[l] (N,), biases[l] (N,) -> (B, N)."""
    out = torch.empty_like(x0)
    for b in range(x0.shape[0]):
        x = [float(v) for v in x0[b]]
        for w, bias in zip(kernels, biases):
            dot = sum(x[n] * float(w[n]) for n in range(len(x)))
            x = [float(x0[b, n]) * dot + float(bias[n]) + x[n] for n in range(len(x))]
        out[b] = torch.tensor(x, dtype=x0.dtype)
    return out


def cross_v2_reference(
    x0: torch.Tensor, us: list[torch.Tensor], vs: list[torch.Tensor], biases: list[torch.Tensor]
) -> torch.Tensor:
    """DCN v2 low-rank cross layer (Wang et al. 2020, eq. 2 with W = U V),
    x_{l+1}[n] = x_0[n] (sum_r U[n, r] sum_m V[r, m] x_l[m] + b[n]) + x_l[n], as loops:
    x0 (B, N), us[l] (N, r), vs[l] (r, N), biases[l] (N,) -> (B, N)."""
    out = torch.empty_like(x0)
    for b in range(x0.shape[0]):
        x = [float(v) for v in x0[b]]
        for u, v, bias in zip(us, vs, biases):
            rank, width = v.shape
            projected = [sum(float(v[r, m]) * x[m] for m in range(width)) for r in range(rank)]
            x = [
                float(x0[b, n]) * (sum(float(u[n, r]) * projected[r] for r in range(rank)) + float(bias[n]))
                + x[n]
                for n in range(width)
            ]
        out[b] = torch.tensor(x, dtype=x0.dtype)
    return out
