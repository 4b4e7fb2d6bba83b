"""Zoo cases built from torch.nn: every layer family ModelBatch supports, and the model
features of issue 8 (parametrizations, a submodule under two names, a buffer re-assigned in
forward, activation checkpointing, Embedding(max_norm), EmbeddingBag(padding_idx),
attention through scaled_dot_product_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.nn.utils import parametrizations as P

from tests.zoo.cases import Case

B = 4


def randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def tokens(g: torch.Generator, vocab: int, *shape: int) -> Tensor:
    return torch.randint(0, vocab, shape, generator=g)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(F.relu(self.bn(self.conv(x)))).flatten(1))


class ResBlock(nn.Module):
    """A ResNet basic block with a strided 1x1 projection shortcut."""

    def __init__(self, cin: int = 3, cout: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, 3))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.head(F.relu(y + self.short(x)))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=tgt.dtype)
        return self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


class MHA(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)
        return out


class EmbedMean(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6, **kwargs)  # type: ignore[arg-type]
        self.fc = nn.Linear(6, 3)

    def forward(self, t: Tensor) -> Tensor:
        return self.fc(self.emb(t).mean(1))


class Bag(nn.Module):
    def __init__(self, mode: str, offsets: bool, **kwargs: object) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 6, mode=mode, **kwargs)  # type: ignore[arg-type]
        self.fc = nn.Linear(6, 3)
        self.offsets = offsets

    def forward(self, t: Tensor) -> Tensor:
        if self.offsets:  # four bags of sizes 3, 0, 5, 4 over the flattened tokens
            flat = t.flatten()[:12]
            return self.fc(self.bag(flat, torch.tensor([0, 3, 3, 8])))
        return self.fc(self.bag(t))


class BagWeighted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 6, mode="sum", padding_idx=0)
        self.score = nn.Embedding(12, 1)

    def forward(self, t: Tensor) -> Tensor:
        return self.bag(t, per_sample_weights=torch.sigmoid(self.score(t)).squeeze(-1))


def with_padding(g: torch.Generator) -> tuple[Tensor]:
    t = tokens(g, 12, B, 5)
    t[0, :2] = 0  # some padding, and one bag of padding only
    t[1] = 0
    return (t,)


class Tied(nn.Module):
    """One block registered under three names: nn.ModuleList([block] * 3)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.blocks = nn.ModuleList([block] * 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Siamese(nn.Module):
    """A backbone referenced twice (two attributes, one module)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
        self.other = self.backbone
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.backbone(x), self.other(-x)], dim=-1))


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight (GPT-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(t))))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 2)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = cp.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(h)


class CheckpointSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(cp.checkpoint_sequential(self.body, 2, x, use_reentrant=False))


class EMA(nn.Module):
    """A buffer re-assigned in forward (an EMA of the features, VQ-VAE style)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.out = nn.Linear(6, 2)
        self.register_buffer("ema", torch.zeros(6))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * h.detach().mean(0)
            self.count = self.count + 1
        return self.out(h - self.ema)


class OldWeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of P.*
            self.fc = nn.utils.weight_norm(nn.Linear(5, 6))
            self.conv = nn.utils.weight_norm(nn.Conv1d(1, 2, 3), dim=None)
        self.out = nn.Linear(2 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)).unsqueeze(1)
        return self.out(self.conv(h).flatten(1))


def parametrized(kind: str) -> nn.Module:
    if kind == "weight_norm":
        a, b = P.weight_norm(nn.Linear(5, 6)), P.weight_norm(nn.Conv1d(1, 2, 3), dim=None)
    elif kind == "spectral_norm":
        a, b = (
            P.spectral_norm(nn.Linear(5, 6)),
            P.spectral_norm(nn.Conv1d(1, 2, 3), n_power_iterations=2),
        )
    else:
        a = P.orthogonal(nn.Linear(5, 6))
        b = P.orthogonal(nn.Conv1d(1, 2, 3), orthogonal_map="cayley")
    return nn.Sequential(a, nn.Tanh(), nn.Unflatten(1, (1, 6)), b, nn.Flatten(), nn.Linear(8, 2))


def activations() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 12),
        nn.GLU(),
        nn.SiLU(),
        nn.Linear(6, 6),
        nn.GELU(approximate="tanh"),
        nn.Mish(),
        nn.Hardswish(),
        nn.ELU(),
        nn.Softplus(),
        nn.LeakyReLU(0.1),
        nn.PReLU(6),
        nn.Linear(6, 2),
        nn.LogSoftmax(-1),
    )


def norms() -> nn.Module:
    # No bias before GroupNorm (standard): the group mean removes most of it, leaving
    # near-zero gradients that Adam turns from float32 rounding noise into steps.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.LayerNorm([4, 8, 8]),
        nn.Flatten(),
        nn.Linear(256, 2),
    )


CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)),
        lambda g: (randn(g, B, 5),),
    ),
    Case(
        "mlp_per_model_adam",
        lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)),
        lambda g: (randn(g, B, 5),),
        per_model=True,
        optimizer="adam",
    ),
    Case("cnn_batchnorm", ConvBN, lambda g: (randn(g, B, 3, 8, 8),)),
    Case("resnet_block", ResBlock, lambda g: (randn(g, B, 3, 8, 8),), optimizer="adam"),
    Case(
        "transformer_encoder",
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            2,
            enable_nested_tensor=False,
        ),
        # SGD: the key projection's bias has a true gradient of zero (softmax ignores a
        # shift), which Adam would turn from rounding noise into steps.
        lambda g: (randn(g, B, 5, 8),),
    ),
    Case(
        "transformer_encoder_eval",
        lambda: nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=True
        ),
        lambda g: (randn(g, B, 5, 8),),
        train=False,
    ),
    Case("transformer_decoder_causal", Decoder, lambda g: (randn(g, B, 5, 8), randn(g, B, 6, 8))),
    Case(
        "multihead_attention_weights",
        lambda: MHA(True),
        lambda g: (randn(g, B, 5, 8), torch.tensor([[False] * 4 + [True]] * B)),
    ),
    Case(
        "multihead_attention_sdpa",
        lambda: MHA(False),
        lambda g: (randn(g, B, 5, 8), torch.tensor([[False] * 4 + [True]] * B)),
    ),
    Case("embedding", EmbedMean, lambda g: (tokens(g, 12, B, 5),), optimizer="adam"),
    Case("embedding_max_norm", lambda: EmbedMean(max_norm=1.0), lambda g: (tokens(g, 12, B, 5),)),
    Case(
        "embedding_padding_scale_grad",
        lambda: EmbedMean(padding_idx=0, scale_grad_by_freq=True),
        with_padding,
    ),
    Case("embedding_bag_sum", lambda: Bag("sum", False), lambda g: (tokens(g, 12, B, 5),)),
    Case("embedding_bag_mean_padding", lambda: Bag("mean", False, padding_idx=0), with_padding),
    Case(
        "embedding_bag_max_padding_offsets", lambda: Bag("max", True, padding_idx=0), with_padding
    ),
    Case(
        "embedding_bag_sum_max_norm_offsets", lambda: Bag("sum", True, max_norm=1.0), with_padding
    ),
    Case("embedding_bag_per_sample_weights", BagWeighted, with_padding),
    Case("norms_group_instance_layer", norms, lambda g: (randn(g, B, 3, 8, 8),), optimizer="adam"),
    Case(
        "conv_transpose",
        lambda: nn.Sequential(
            nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 2, 3),
        ),
        lambda g: (randn(g, B, 3, 4, 4),),
    ),
    Case(
        "conv1d_pool",
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=2, dilation=2),
            nn.MaxPool1d(2),
            nn.AvgPool1d(2),
            nn.ConvTranspose1d(4, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(16, 2),
        ),
        lambda g: (randn(g, B, 2, 16),),
    ),
    Case(
        "conv3d_pool",
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1, groups=1),
            nn.BatchNorm3d(2),
            nn.AvgPool3d(2),
            nn.AdaptiveMaxPool3d(1),
            nn.Flatten(),
            nn.Linear(2, 2),
        ),
        lambda g: (randn(g, B, 1, 4, 4, 4),),
    ),
    Case(
        "pooling_variants",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            nn.LPPool2d(2, 2),
            nn.AdaptiveAvgPool2d(3),
            nn.AdaptiveMaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 2),
        ),
        lambda g: (randn(g, B, 2, 8, 8),),
    ),
    Case(
        "pixel_shuffle_upsample",
        lambda: nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1),
            nn.PixelShuffle(2),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.PixelUnshuffle(2),
            nn.Upsample(size=(5, 5), mode="nearest"),
            nn.Conv2d(8, 1, 3),
        ),
        lambda g: (randn(g, B, 2, 4, 4),),
    ),
    Case("activations", activations, lambda g: (randn(g, B, 5),), optimizer="adam"),
    Case("weight_norm", lambda: parametrized("weight_norm"), lambda g: (randn(g, B, 5),)),
    Case("spectral_norm", lambda: parametrized("spectral_norm"), lambda g: (randn(g, B, 5),)),
    Case(
        "spectral_norm_eval",
        lambda: parametrized("spectral_norm"),
        lambda g: (randn(g, B, 5),),
        train=False,
    ),
    Case(
        "orthogonal",
        lambda: parametrized("orthogonal"),
        lambda g: (randn(g, B, 5),),
        optimizer="adam",
    ),
    Case("old_weight_norm", OldWeightNorm, lambda g: (randn(g, B, 5),)),
    Case("tied_module_list", Tied, lambda g: (randn(g, B, 6),)),
    Case("backbone_twice", Siamese, lambda g: (randn(g, B, 5),), optimizer="adam"),
    Case("tied_embedding_head", TiedLM, lambda g: (tokens(g, 12, B, 5),)),
    Case("checkpoint_non_reentrant", lambda: Checkpointed(False), lambda g: (randn(g, B, 5),)),
    Case("checkpoint_reentrant", lambda: Checkpointed(True), lambda g: (randn(g, B, 5),)),
    Case("checkpoint_sequential", CheckpointSequential, lambda g: (randn(g, B, 5),)),
    Case("ema_buffer", EMA, lambda g: (randn(g, B, 5),)),
]
