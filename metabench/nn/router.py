"""Task router (SMAT's "hypernetwork"): support-set class prototypes -> expert merging weights.

SMAT (Chen et al., ICML 2024, arXiv:2403.08477) merges M sparse interpolated experts with weights
predicted from the support set. The router reads the class prototypes of the frozen pretrained
model together with a few learned tokens through one transformer block and scores a task embedding
against M learned expert keys.

Two departures from the upstream code, both deliberate:

* every tensor (tokens, keys, block, norm) is a registered ``nn.Parameter``, so all of it is trained
  and checkpointed (upstream's keys and tokens were plain tensors: never trained, never saved);
* the block has no positional embedding and the task embedding is read at a learned token, so the
  embedding, and hence alpha, does not depend on the order of the classes (upstream read token 0,
  a prototype, which made alpha depend on the label order).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["TaskRouter", "merge_weights", "relaxed_bernoulli_scores"]


def relaxed_bernoulli_scores(logits: Tensor, temperature: float, sample: bool,
                             generator: torch.Generator | None = None) -> Tensor:
    """Expert scores in (0, 1): a RelaxedBernoulli(temperature, logits) draw when ``sample``, else
    ``sigmoid(logits / temperature)`` (its noise-free value, used at evaluation)."""
    if not sample:
        return torch.sigmoid(logits / temperature)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def merge_weights(scores: Tensor) -> Tensor:
    """Soft merge weights alpha = s / sum(s): every expert contributes, none is dropped (no top-k)."""
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)


def _heads(dim: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` that divides ``dim`` (tiny test models have odd widths)."""
    return max(h for h in range(1, wanted + 1) if dim % h == 0)


class TaskRouter(nn.Module):
    """Prototypes ``[way, d]`` -> expert logits ``[M]``, invariant to the order of the prototypes.

    Args:
        dim: feature width of the backbone (prototype width).
        n_experts: M.
        n_tokens: learned "skill" tokens prepended to the prototypes; the first one carries the task embedding.
        heads: attention heads of the block (reduced to a divisor of ``dim`` when needed).
        mlp_ratio: width of the block's MLP (2, as upstream).
        spectral_norm: spectral normalisation on the block's Linear layers (as upstream), which keeps
            the router Lipschitz so that alpha varies smoothly between similar tasks.
    """

    def __init__(self, dim: int, n_experts: int, *, n_tokens: int = 4, heads: int = 4, mlp_ratio: float = 2.0,
                 spectral_norm: bool = True) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"The router needs at least one learned token (router_tokens={n_tokens}).")
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.block = Block(dim, _heads(dim, heads), mlp_ratio=mlp_ratio, qkv_bias=True)
        if spectral_norm:
            for layer in (self.block.attn.qkv, self.block.attn.proj, self.block.mlp.fc1, self.block.mlp.fc2):
                nn.utils.parametrizations.spectral_norm(layer)
        self.norm = nn.LayerNorm(dim)  # task embedding at unit scale, whatever the backbone's feature norm
        self.keys = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.kaiming_normal_(self.keys)

    def embed(self, prototypes: Tensor) -> Tensor:
        """Task embedding ``[d]``: the block output at the first learned token (no positional embedding)."""
        tokens = torch.cat([self.tokens, prototypes.to(self.tokens.dtype)])[None]  # [1, n_tokens + way, d]
        return self.norm(self.block(tokens)[0, 0])

    def forward(self, prototypes: Tensor) -> Tensor:
        """Expert logits ``[M]``: key . embedding (Kaiming keys and a normalised embedding give logits of
        variance about 2 at init, so the first relaxed-Bernoulli draws are neither flat nor saturated)."""
        return self.keys @ self.embed(prototypes)

    def alpha(self, prototypes: Tensor, temperature: float, sample: bool) -> tuple[Tensor, Tensor]:
        """Merge weights ``[M]`` (summing to 1) and the logits that produced them."""
        logits = self(prototypes)
        return merge_weights(relaxed_bernoulli_scores(logits, temperature, sample)), logits

