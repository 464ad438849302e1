"""Attention and Transformer blocks whose projections can carry dendrites in every mode.

``nn.MultiheadAttention`` never calls its projections: it passes the packed ``in_proj_weight`` and
``out_proj.weight`` to a functional kernel. ``nn.TransformerEncoderLayer`` does the same with
``linear1``/``linear2`` on its "fast path" (eval mode, no gradients, the usual settings — exactly a validation
loop). A :class:`~pb_lightning.engine.layer.PerforatedLayer` around any of these modules would learn in training and
be bypassed in validation and deployment.

:func:`prepare_attention` therefore changes, in place and before wrapping, the class of each such
block whose projections are to be perforated to a subclass defined here:

* :class:`PerforatableMultiheadAttention` holds the q/k/v projections as ``nn.Linear`` children
  (``q_proj``, ``k_proj``, ``v_proj``; ``out_proj`` stays) and calls every projection as a
  module. Without dendrites it computes what ``nn.MultiheadAttention``'s reference path computes.
  Its state dict has ``q_proj.weight`` … instead of ``in_proj_weight``; a state dict of the
  unconverted module (packed or separate projection weights) still loads.
* :class:`PerforatableTransformerEncoderLayer` never takes the fast path.

A ``nn.TransformerEncoder`` over converted layers gets ``use_nested_tensor = False`` (its nested
tensor fast path also reads the first layer's weights). ``nn.TransformerDecoderLayer``,
``nn.TransformerDecoder`` and ``nn.Transformer`` call their children as modules and need nothing
beyond their attention modules' conversion.

Subclasses of these torch modules that inherit the weight-reading ``forward`` are not converted
(their authors may rely on more than the forward); :func:`weight_reading_parents` names them so
that ``perforate()`` skips or refuses their children instead of wrapping them silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class PerforatableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that calls its q/k/v/out projections as modules.

    Made by :meth:`convert` from an existing instance (its class is changed in place and its
    packed projection weights are split into three ``nn.Linear``); it is never constructed
    directly. Everything ``nn.MultiheadAttention`` supports is supported (masks, ``is_causal``,
    ``need_weights``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, unbatched input),
    except nested tensors.
    """

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module

    @classmethod
    def projections_of(cls, mha: nn.MultiheadAttention) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` q/k/v projections that hold ``mha``'s projection weights (copies)."""
        e, bias = mha.embed_dim, mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = bias.detach().chunk(3) if bias is not None else (None, None, None)
        out: dict[str, nn.Linear] = {}
        for name, w, b in zip(_PROJECTIONS, weights, biases, strict=True):
            linear = nn.Linear(w.shape[1], e, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            linear.weight.requires_grad_(
                (mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight).requires_grad
            )
            if b is not None:
                linear.bias.requires_grad_(bias.requires_grad)
            out[name] = linear
        return out

    @classmethod
    def convert(cls, mha: nn.MultiheadAttention, projections: dict[str, nn.Linear] | None = None) -> None:
        """Turn ``mha`` (an ``nn.MultiheadAttention``) into this class, in place.

        The q/k/v weights move into new parameters (an optimizer built before must be rebuilt;
        ``perforate()`` runs before optimizers exist). ``in_proj_weight``, ``in_proj_bias`` and
        ``q/k/v_proj_weight`` stay as attributes holding ``None``, so code that tests them (torch's
        fast-path checks) sees a module without packed weights.
        """
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"only nn.MultiheadAttention itself can be converted; got {type(mha).__name__}")
        projections = cls.projections_of(mha) if projections is None else projections
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            mha._parameters.pop(name, None)
            mha.register_parameter(name, None)
        mha.__class__ = cls
        others = dict(mha._modules)
        mha._modules.clear()
        for name, linear in projections.items():
            mha.add_module(name, linear)
        mha._modules.update(others)  # q, k, v, then out_proj: the order they run in

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # An unconverted module's state dict: split its packed (or separate) projection weights
        # into the q/k/v children's keys, wherever those now keep their weights.
        packed_w = state_dict.pop(prefix + "in_proj_weight", None)
        packed_b = state_dict.pop(prefix + "in_proj_bias", None)
        weights = packed_w.chunk(3) if packed_w is not None else None
        separate = [state_dict.pop(prefix + f"{p}_weight", None) for p in _PROJECTIONS]
        if weights is None and all(w is not None for w in separate):
            weights = tuple(separate)
        if weights is not None or packed_b is not None:
            biases = packed_b.chunk(3) if packed_b is not None else (None, None, None)
            for i, name in enumerate(_PROJECTIONS):
                target = prefix + name + "." + _weights_prefix(getattr(self, name))
                if weights is not None:
                    state_dict[target + "weight"] = weights[i]
                if biases[i] is not None:
                    state_dict[target + "bias"] = biases[i]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(
                "A perforated nn.MultiheadAttention does not take nested tensors (torch supports them only on "
                "the fast path, which bypasses the projections' dendrites)."
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, is_batched
        )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
        is_batched: bool,
    ) -> tuple[Tensor, Tensor | None]:
        # torch.nn.functional.multi_head_attention_forward, with the projections called as modules.
        num_heads, head_dim = self.num_heads, self.head_dim
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, key.shape[0]):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, key.shape[0])}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = q.new_zeros(bsz * num_heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected {(bsz, src_len)}."
                )
            # Shapes named, not inferred: an empty sequence (src_len = 0) leaves -1 nothing to infer from.
            expanded = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
            key_padding_mask = expanded.reshape(bsz * num_heads, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(attn)  # its width named: an empty batch leaves -1 nothing to infer from
            out = out.view(tgt_len, bsz, out.shape[-1])
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, attn_mask.shape[-2], src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(attn)
        out = out.view(tgt_len, bsz, out.shape[-1])
        if not is_batched:
            out = out.squeeze(1)
        return out, None


def _weights_prefix(module: nn.Module) -> str:
    """Where a projection keeps its weight under its own prefix: ``""``, or ``"module."`` once wrapped."""
    return "" if isinstance(module, nn.Linear) else "module."


class PerforatableTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the fast path: it always calls its children.

    The fast path (``torch._transformer_encoder_layer_fwd``) reads the weights of ``linear1``,
    ``linear2`` and the attention projections, so their dendrites would not run. This is torch's
    own reference path, unchanged.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


#: Why a torch module that reads its children's weights cannot have them perforated unconverted.
_READS_WEIGHTS = {
    nn.MultiheadAttention: "nn.MultiheadAttention passes its projections' weights to a functional kernel "
    "instead of calling them",
    nn.TransformerEncoderLayer: "nn.TransformerEncoderLayer's fast path (eval mode without gradients) reads "
    "its children's weights instead of calling them",
}


def weight_reading_parents(model: nn.Module) -> dict[int, str]:
    """Modules of ``model`` that read their children's weights, by ``id``, with the reason.

    These are torch's attention blocks that :func:`prepare_attention` did not convert: ones a
    selector excluded, and user subclasses that inherit the weight-reading ``forward``.
    """
    found: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, (PerforatableMultiheadAttention, PerforatableTransformerEncoderLayer)):
            continue
        for base, reason in _READS_WEIGHTS.items():
            if isinstance(module, base) and type(module).forward is base.forward:
                inherited = f"{type(module).__name__} inherits {base.__name__}.forward: {reason}"
                found[id(module)] = reason if type(module) is base else inherited
    return found


def prepare_attention(
    model: nn.Module, selected: Callable[[nn.Module, str], bool], excluded: Callable[[nn.Module, str], bool]
) -> list[str]:
    """Convert the attention blocks of ``model`` whose projections ``selected`` would wrap.

    Args:
        model: the model, converted in place.
        selected: ``selected(module, qualified_name)``: whether ``perforate()`` would wrap it.
        excluded: ``excluded(module, qualified_name)``: whether ``exclude`` names it; an excluded
            block is left as it is (and its children then cannot be perforated).

    Returns:
        The qualified names of the converted modules.
    """
    converted: list[str] = []
    # Attention in an encoder-layer subclass that keeps torch's fast path stays as it is (see weight_reading_parents).
    held = {
        id(m.self_attn)
        for m in model.modules()
        if isinstance(m, nn.TransformerEncoderLayer)
        and type(m) is not nn.TransformerEncoderLayer
        and type(m).forward is nn.TransformerEncoderLayer.forward
    }
    for name, module in list(model.named_modules()):
        if (
            type(module) is not nn.MultiheadAttention
            or id(module) in held
            or selected(module, name)
            or excluded(module, name)
        ):
            continue
        prefix = f"{name}." if name else ""
        projections = PerforatableMultiheadAttention.projections_of(module)
        wanted = any(selected(p, prefix + n) for n, p in projections.items()) or selected(
            module.out_proj, prefix + "out_proj"
        )
        if wanted:
            PerforatableMultiheadAttention.convert(module, projections)
            converted.append(name)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.TransformerEncoderLayer or selected(module, name) or excluded(module, name):
            continue
        prefix = f"{name}." if name else ""
        children = [(prefix + n, m) for n, m in module.named_modules() if n]
        if isinstance(module.self_attn, PerforatableMultiheadAttention) or any(selected(m, n) for n, m in children):
            module.__class__ = PerforatableTransformerEncoderLayer
            converted.append(name)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer, PerforatableTransformerEncoderLayer) for layer in module.layers
        ):
            # Its nested-tensor fast path reads the first layer's packed weights.
            module.use_nested_tensor = False
    return converted
