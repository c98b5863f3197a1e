"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Parameter names follow the official checkpoints (``layers.N.self_attn.q_proj``,
``layers.N.cross_attn_token_to_image``, ``layers.N.mlp.lin1``, ``norm_final_attn`` ...).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention.

    Args:
        depth: number of two-way blocks (2 in SAM).
        embedding_dim: token width (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the token MLPs (2048).
        activation: MLP activation.
        attention_downsample_rate: the cross-attentions project to ``embedding_dim / rate``.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            image_embedding: ``B x C x h x w``.
            image_pe: positional encoding of the same shape.
            point_embedding: prompt tokens ``B x N x C`` (also used as their positional encoding).

        Returns:
            processed tokens ``B x N x C`` and processed image tokens ``B x (h*w) x C``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attended = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attended)
        return queries, keys

    def forward_tokens(
        self,
        keys: Tensor,
        key_pe: Tensor,
        point_embedding: Tensor,
        keys_with_pe: Optional[Tensor] = None,
        first_layer: Optional[ImageProjections] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Eval-mode fast path on image *tokens*; the same function as :meth:`forward`.

        Args:
            keys: image tokens ``B' x (h*w) x C``; ``B' = 1`` is shared by all prompts.
            key_pe: their positional encoding, ``1 x (h*w) x C``.
            point_embedding: prompt tokens ``B x N x C``.
            keys_with_pe: ``keys + key_pe`` when the caller has it (cached per image).
            first_layer: the first block's image-side projections of these (shared) keys, from
                :meth:`project_first_layer` (cached per image), or None.

        The cross-attentions use :meth:`Attention.tokens_to_image` and
        :meth:`Attention.image_to_tokens`, which never project the image tokens.
        """
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer.forward_tokens(
                queries,
                keys,
                point_embedding,
                key_pe,
                keys_with_pe if i == 0 else None,
                first_layer if i == 0 else None,
                keys_owned=i > 0,
            )
        attended = self.final_attn_token_to_image.tokens_to_image(
            queries + point_embedding, keys + key_pe, keys
        )
        queries = self.norm_final_attn(queries + attended)
        return queries, keys

    def project_first_layer(self, keys: Tensor, keys_with_pe: Tensor) -> ImageProjections:
        """The first block's projections of ``1 x N x C`` image tokens (prompt-independent).

        Worth it when several prompts are decoded on the same image: the first block's
        cross-attentions then cost O(T N ch) instead of O(T N C) per prompt.
        """
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        # Computed transposed (weights @ tokens^T), which is directly the heads x ch x N layout
        # the attention products want; the two projections of keys_with_pe share one product.
        n = keys.shape[1]
        on_pe = torch.cat([t2i.k_proj.weight, i2t.q_proj.weight])
        bias = torch.cat([t2i.k_proj.bias, i2t.q_proj.bias])[:, None]
        k_t, q_t = torch.addmm(bias, on_pe, keys_with_pe[0].t()).split(
            [t2i.internal_dim, i2t.internal_dim]
        )
        v_t = torch.addmm(t2i.v_proj.bias[:, None], t2i.v_proj.weight, keys[0].t())
        return ImageProjections(
            k_t2i=k_t.reshape(1, t2i.num_heads, -1, n),
            v_t2i=v_t.reshape(1, t2i.num_heads, -1, n),
            q_i2t=q_t.reshape(1, i2t.num_heads, -1, n),
        )


class ImageProjections(NamedTuple):
    """Projections of the (shared) image tokens for the first two-way block."""

    k_t2i: Tensor  # 1 x heads x ch x N: keys of the token-to-image attention
    v_t2i: Tensor  # 1 x heads x ch x N: values of the token-to-image attention
    q_i2t: Tensor  # 1 x heads x ch x N: queries of the image-to-token attention


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention.

    Each sub-layer is residual and followed by a LayerNorm (post-norm).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> Tuple[Tensor, Tensor]:
        # 1. tokens attend to themselves; the first block has no residual and no PE here
        #    (its input tokens are the positional encodings already).
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # 2. tokens attend to the image.
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        # 3. token MLP.
        queries = self.norm3(queries + self.mlp(queries))

        # 4. the image attends to the tokens.
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys

    def forward_tokens(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        keys_with_pe: Optional[Tensor] = None,
        projected: Optional[ImageProjections] = None,
        keys_owned: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """:meth:`forward` with the low-rank cross-attentions; ``keys`` may be ``1 x N x C``
        (shared by the ``B`` prompts), ``keys_with_pe`` is ``keys + key_pe`` if known, and
        ``projected`` the image-side projections of these keys if known. ``keys_owned``: the
        caller's own ``B x N x C`` keys (not a cached image), updated in place."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe if keys_with_pe is None else keys_with_pe
        t2i = self.cross_attn_token_to_image
        if projected is None:
            attended = t2i.tokens_to_image(q, k, keys)
        else:
            attended = t2i.tokens_to_projected_image(q, projected.k_t2i, projected.v_t2i)
        queries = self.norm2(queries + attended)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        i2t = self.cross_attn_image_to_token
        q_image = None if projected is None else projected.q_i2t
        in_place = keys_owned and keys.shape[0] == queries.shape[0]
        keys = self.norm4(
            i2t.image_to_tokens(k, q, queries, q_image, residual=keys, in_place=in_place)
        )
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``B x Nq x C``, ``B x Nk x C``, ``B x Nk x C`` -> ``B x Nq x C``."""
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    # The methods below compute ``forward`` for the decoder's cross-attentions, where one side is
    # the few prompt tokens (T ~ 7) and the other the 4096 image tokens, without projecting the
    # image tokens: the projections are moved to the token side (a product of the image tokens
    # with ``heads * T`` vectors instead of with ``internal_dim`` weight rows), the same maths
    # re-associated. Scores are laid out ``heads x T x N`` so every softmax runs over
    # contiguous N-long rows or, across the T tokens, vectorised along them.

    def tokens_to_image(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``forward(q, k, v)`` for ``B x T x C`` token queries and ``B' x N x C`` image keys and
        values (``B'`` = 1 or B; not projected here)."""
        b, t, c = q.shape
        heads = self.num_heads
        ch = self.internal_dim // heads
        qh = self.q_proj(q).reshape(b, t, heads, ch).transpose(1, 2)  # B x h x T x ch
        wk = self.k_proj.weight.reshape(heads, ch, c)
        # scores = (q_h . (Wk_h x + bk_h)) / sqrt(ch); the q_h . bk_h term is the same for every
        # image token, so it cancels in the softmax over image tokens.
        m = torch.matmul(qh, wk).mul_(ch**-0.5).reshape(b, heads * t, c)
        p = torch.softmax(torch.matmul(m, k.transpose(1, 2)), dim=-1)  # B x (h T) x N
        # sum_i p_i (Wv x_i + bv) = Wv (sum_i p_i x_i) + bv, since the p_i sum to 1.
        pooled = torch.matmul(p, v).reshape(b, heads, t, c)
        wv = self.v_proj.weight.reshape(heads, ch, c)
        out = torch.matmul(pooled, wv.transpose(1, 2))  # B x h x T x ch
        out = out + self.v_proj.bias.reshape(heads, 1, ch)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.internal_dim))

    def tokens_to_projected_image(self, q: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        """``forward(q, k, v)`` with the image side already projected, both transposed:
        ``k_t`` and ``v_t`` are ``B' x heads x ch x N``."""
        b, t, _ = q.shape
        heads = self.num_heads
        ch = self.internal_dim // heads
        qh = self.q_proj(q).reshape(b, t, heads, ch).transpose(1, 2).mul(ch**-0.5)
        p = torch.softmax(torch.matmul(qh, k_t), dim=-1)  # B x h x T x N
        out = torch.matmul(p, v_t.transpose(-1, -2))  # B x h x T x ch
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.internal_dim))

    def image_to_tokens(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_projected_t: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
        in_place: bool = False,
    ) -> Tensor:
        """``forward(q, k, v)`` (plus ``residual`` if given, ``B' x N x C``) for ``B' x N x C``
        image queries (not projected here, or given projected as ``B' x heads x ch x N`` in
        ``q_projected_t``) and ``B x T x C`` token keys and values. ``in_place``: the sum is
        written into ``residual`` (then ``B x N x C`` and the caller's own), which saves a copy
        of the image tokens."""
        b, t, c = k.shape
        heads = self.num_heads
        ch = self.internal_dim // heads
        scale = ch**-0.5
        kh = self.k_proj(k).reshape(b, t, heads, ch).transpose(1, 2)  # B x h x T x ch
        vh = self.v_proj(v).reshape(b, t, heads, ch).transpose(1, 2)
        if q_projected_t is None:
            wq = self.q_proj.weight.reshape(heads, ch, c)
            # scores_i = ((Wq_h x_i + bq_h) . k_h) / sqrt(ch) = x_i . (Wq_h^T k_h) + bq_h . k_h
            m = torch.matmul(kh, wq).mul_(scale).reshape(b, heads * t, c)
            const = (kh * self.q_proj.bias.reshape(1, heads, 1, ch)).sum(-1).mul_(scale)
            scores = torch.matmul(m, q.transpose(1, 2))  # B x (h T) x N
            scores += const.reshape(b, heads * t, 1)
        else:
            scores = torch.matmul(kh.mul(scale), q_projected_t)  # B x h x T x N
        n = scores.shape[-1]
        # Softmax over the T tokens of each head: in the h x T x N layout it reduces across
        # N-long contiguous rows (vectorised), not along rows of length T.
        p = torch.softmax(scores.reshape(b, heads, t, n), dim=2).reshape(b, heads * t, n)
        # out_i = Wo concat_h(sum_t p v_h) + bo = sum_{h,t} p (Wo_h v_h + bo / heads), since for
        # each head the p sum to 1: the bias rides in the same product.
        wo = self.out_proj.weight.reshape(c, heads, ch).permute(1, 2, 0)  # h x ch x C
        u = torch.matmul(vh, wo).add_(self.out_proj.bias / heads).reshape(b, heads * t, c)
        if residual is None:
            return torch.matmul(p.transpose(1, 2), u)
        if in_place:
            return residual.baddbmm_(p.transpose(1, 2), u)
        return torch.baddbmm(residual.expand(b, -1, -1), p.transpose(1, 2), u)
