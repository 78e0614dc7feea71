"""MAE (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners").

    patches = patchify(x)                              # N x L x (p*p*3)
    keep = random 25% of the L patches, per image      # argsort of uniform noise
    latent = encoder([cls] + embed(patches[keep]) + pos)       # visible tokens only
    tokens = unshuffle(decoder_embed(latent) + [mask_token] * masked) + decoder_pos
    pred = decoder_pred(decoder(tokens))               # pixels of every patch
    target = patches, or (patches - mean) / sqrt(var + 1e-6) per patch (norm_pix_loss)
    loss = mean over MASKED patches of mean_j (pred - target)^2

The encoder is the backbone's timm VisionTransformer itself, with its learned position
embedding replaced by frozen 2-D sin-cos values, so the evaluated and exported backbone is a
plain timm ViT: called on a whole image it sees every patch (no masking) and returns the cls
token after the final norm, the feature of MAE's linear-probe protocol.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sslzoo.augment.recipes import SingleView
from sslzoo.losses.reconstruction import MaskedReconstructionLoss
from sslzoo.methods.base import SSLMethod
from sslzoo.nn.vit import sincos_2d
from sslzoo.optim.settings import Optimization

VIEWS = SingleView(crop_min_scale=0.2)  # main_pretrain.py: RandomResizedCrop(scale=(0.2, 1))
# PRETRAIN.md: AdamW (0.9, 0.95), blr 1.5e-4 per 256 images, wd 0.05, 40 warmup epochs
OPTIM = Optimization(
    optimizer="adamw", lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=40.0
)


def position_table(dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The official ``get_2d_sincos_pos_embed`` (mae ``util/pos_embed.py``) with its zero cls
    row, (1, 1 + H*W, dim): the first half of the channels encodes the column, the second the
    row, computed in float64 as numpy does."""
    table = sincos_2d(grid_size, dim, first="cols", dtype=torch.float64)
    return torch.cat([torch.zeros(1, dim), table])[None]


class MAE(SSLMethod):
    """MAE with the official (facebookresearch/mae, ``PRETRAIN.md``) defaults.

    The released models were all trained with ``norm_pix_loss``, so it is on by default here
    (the code's flag defaults to off). AdamW betas (0.9, 0.95), weight decay 0.05 on weights
    and on the cls/mask tokens (timm ``add_weight_decay``; biases and norms get none), base
    lr 1.5e-4 per 256 images, 40 warmup epochs, cosine to 0; effective batch 4096, 800 epochs
    for ViT-L (1600 for the released checkpoints).

    Args:
        mask_ratio: share of the patches of each image hidden from the encoder.
        decoder_embed_dim: width of the decoder.
        decoder_depth: number of decoder transformer blocks.
        decoder_num_heads: attention heads of the decoder blocks.
        decoder_mlp_ratio: MLP width of the decoder blocks, relative to their width.
        norm_pix_loss: regress per-patch normalised pixels, (x - mean) / sqrt(var + 1e-6).
        probe_full_image: hand the online probe the cls feature of the whole unmasked image
            (what evaluation sees; one extra gradient-free encoder pass) instead of the cls
            token of the visible patches (free, but not the evaluated input).
        backbone: a timm VisionTransformer name (cls token, no register tokens).
        backbone_kwargs: backbone constructor arguments (``img_size``, ``patch_size``, ...).
        views: the official view: a bicubic crop of at least 20% of the image, a flip.
        optim: AdamW (0.9, 0.95), blr 1.5e-4 per 256 images, wd 0.05, warmup 40 epochs.
        init_backbone: a weights file the backbone (and its teachers) start from: see
            :class:`~sslzoo.methods.base.SSLMethod`.
        freeze_backbone_steps: first optimizer steps that train the heads only.
    """

    # FSDP2: the ViT internals are called directly, not the backbone's forward, so backbones
    # and heads are not units of their own (their blocks are); see sslzoo.sharding.shard_method
    fsdp_units: tuple[str, ...] = ()

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        probe_full_image: bool = True,
        backbone: str = "vit_large_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        views: SingleView = VIEWS,
        optim: Optimization = OPTIM,
        init_backbone: str | None = None,
        freeze_backbone_steps: int = 0,
    ) -> None:
        super().__init__(
            backbone,
            backbone_kwargs,
            views=views,
            optim=optim,
            init_backbone=init_backbone,
            freeze_backbone_steps=freeze_backbone_steps,
        )
        vit = self.backbone.model
        if not (
            isinstance(vit, VisionTransformer)
            and vit.cls_token is not None
            and vit.reg_token is None
            and vit.pos_embed is not None
            and not vit.no_embed_class
            and not vit.dynamic_img_size
        ):
            raise ValueError(
                f"MAE needs a timm VisionTransformer with a cls token, a position embedding, "
                f"no register tokens and a fixed image size; got {backbone!r}"
            )
        patch_h, patch_w = vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"MAE needs square patches, got {vit.patch_embed.patch_size}")
        self.patch_size = patch_h
        self.grid_size = tuple(vit.patch_embed.grid_size)
        dim = vit.embed_dim

        vit.pos_embed = nn.Parameter(position_table(dim, self.grid_size), requires_grad=False)
        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            position_table(decoder_embed_dim, self.grid_size), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                decoder_mlp_ratio,
                qkv_bias=True,
                norm_layer=LayerNorm,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * 3)
        self.initialize_weights()
        self.criterion = MaskedReconstructionLoss(norm_pix_loss)

    def initialize_weights(self) -> None:
        """The official init: patch embedding like a Linear (xavier_uniform on the flattened
        kernel), cls and mask tokens normal(0.02), every Linear xavier_uniform with zero bias,
        every LayerNorm weight 1 and bias 0."""
        vit = self.backbone.model
        kernel = vit.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(kernel.view(kernel.shape[0], -1))
        nn.init.normal_(vit.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- the model, top to bottom
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3), patches in row-major order, pixels (row, col, channel)."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W), the inverse of :meth:`patchify`."""
        p = self.patch_size
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, -1)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], -1, h * p, w * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep ``int(L * (1 - mask_ratio))`` tokens of each sequence, chosen by sorting
        uniform noise per sample. Returns the kept tokens (in shuffled order), the binary mask
        (1 = masked, in the original order) and ``ids_restore``, the argsort that unshuffles.

        The count is the official float expression, truncated: ``int(196 * (1 - 0.9))`` is
        19, not 20, since ``1 - 0.9`` is slightly below 0.1.
        """
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backbone ViT on the visible patches plus the cls token: (latent, mask,
        ids_restore); ``latent[:, 0]`` is the cls token."""
        vit = self.backbone.model
        x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.norm_pre(torch.cat([cls, x], dim=1))
        x = vit.norm(vit.blocks(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Mask tokens fill the hidden positions, the sequence is unshuffled, and the decoder
        predicts the pixels of every patch: (N, L, p*p*3)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The reconstruction loss (``self.criterion``) of the patches of ``imgs``."""
        return self.criterion(self.patchify(imgs), pred, mask)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred, mask, latent) of one masked reconstruction."""
        ratio = self.hparams.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, latent

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        (x,), labels = batch
        loss, _, _, latent = self(x)
        embeddings = latent[:, 0]
        if self.hparams.probe_full_image:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = embeddings
        return self.training_outputs(loss, embeddings, features, labels)
