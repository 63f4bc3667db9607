"""RobometerModel: transformers' Qwen3VLModel plus the progress / success / preference heads.

Attribute names follow the released checkpoint (class RBM / RFM of the official code): the backbone is
``self.model`` (a ``Qwen3VLModel``, so keys ``model.visual.*`` and ``model.language_model.*``) and the heads
are ``progress_head``, ``success_head``, ``preference_head`` (``nn.Sequential``: ``<head>.0.weight`` ...).

Two ways to run it (docs/ARCHITECTURE.md "Model split"):

* ``forward`` — the reference method: the standard Qwen3VLModel forward from input_ids + pixel_values of all
  frames, then the heads at every ``<|prog_token|>`` (and the ``<|pref_token|>``). Used for parity tests and
  as "the reference method" in benchmarks.
* ``encode_frame`` (once per frame, cacheable) + ``forward_language`` (per step) — the split the engine
  exports. No data-dependent ops: visual positions are gathered by index and merged with ``torch.where``,
  and the deepstack features are added the same way after the first k decoder layers. The result equals
  the reference path (tested to 1e-5 on tiny models).
* ``forward_prefix`` (once per instruction and first frame) + ``forward_suffix`` (per step, batchable) —
  ``forward_language`` cut after the first frame's ``<|prog_token|>``: the prefix returns every layer's
  keys/values and the first frame's heads, the suffix runs the other frames on top of them. Causal
  attention makes this exact (tested to 1e-5 against ``forward_language``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Qwen3VLConfig, Qwen3VLModel
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from robometer_ros.model.config import RobometerConfig
from robometer_ros.model.heads import expected_progress, prediction_head

GridTHW = tuple[int, int, int]


def _cache_keyword(function: Callable[..., Any]) -> str:
    """The name under which ``function`` takes the key/value cache: ``cache`` (the pinned transformers 5.24) or
    ``past_key_values`` (transformers up to at least 5.17, e.g. a GPU machine's preinstalled one).

    The decoder layers take ``**kwargs``, so passing the wrong name would not fail: the prefix cache would be
    silently ignored and prefix reuse would be wrong. Asking the signature keeps both versions exact.
    """
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


#: create_causal_mask's cache argument in the installed transformers
_MASK_CACHE_KW = _cache_keyword(create_causal_mask)


def build_backbone_config(config: RobometerConfig, attn_implementation: str = "sdpa") -> Qwen3VLConfig:
    """The transformers Qwen3VLConfig of a RobometerConfig (legacy rope_scaling dicts are converted)."""
    backbone = {k: v for k, v in config.backbone.items() if k not in ("architectures", "auto_map")}
    qwen_config = Qwen3VLConfig(**backbone)
    qwen_config._attn_implementation = attn_implementation
    qwen_config.text_config._attn_implementation = attn_implementation
    qwen_config.vision_config._attn_implementation = attn_implementation
    return qwen_config


class _PrefixCache:
    """Stands in for a transformers ``Cache`` during one language forward (export-friendly: plain tensors).

    The decoder's attention calls ``update(key, value, layer_idx)`` with the new positions' keys (after
    k_norm and M-RoPE) and values; this records them (the prefix's KV to hand back) and returns them
    behind the given past keys/values of that layer, if any (the suffix attends to the prefix).
    """

    def __init__(self, past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None) -> None:
        self.past_keys, self.past_values = past_keys, past_values
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(key_states)
        self.values.append(value_states)
        if self.past_keys is None or self.past_values is None:
            return key_states, value_states
        # the prefix has batch 1; every prompt of the batch attends to it
        batch = key_states.shape[0]
        past_k = self.past_keys[layer_idx].to(key_states.dtype).expand(batch, -1, -1, -1)
        past_v = self.past_values[layer_idx].to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)


class RobometerModel(nn.Module):
    """The Robometer reward model (see the module docstring for the two ways to run it)."""

    def __init__(self, config: RobometerConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3VLModel(build_backbone_config(config, attn_implementation))
        hidden = config.hidden_size
        self.progress_head = prediction_head(hidden, config.num_bins, config.head_dropout)
        self.preference_head = prediction_head(hidden, 1, config.head_dropout)
        self.success_head = prediction_head(hidden, 1, config.head_dropout)
        # Grid-dependent vision tensors (position-embedding resampling, rotary ids) per (grid, device):
        # computed once on the host so encode_frame traces them as constants.
        self._grid_cache: dict[tuple[GridTHW, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_deepstack(self) -> int:
        return len(self.model.visual.deepstack_visual_indexes)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    def tokens_per_frame(self, grid_thw: GridTHW) -> int:
        """Visual tokens one frame of this patch grid becomes in the language model."""
        t, h, w = grid_thw
        return t * h * w // (self.config.spatial_merge_size**2)

    # ------------------------------------------------------------------ heads
    def apply_heads(self, frame_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Progress logits [F, bins] and success logits [F] from the hidden states at the prog tokens."""
        frame_hidden = frame_hidden.to(self.progress_head[0].weight.dtype)
        return self.progress_head(frame_hidden), self.success_head(frame_hidden).squeeze(-1)

    def apply_preference_head(self, pref_hidden: torch.Tensor) -> torch.Tensor:
        """Preference logit [1] (sigmoid = P(A preferred)) from the pref-token hidden state [1, H]."""
        return self.preference_head(pref_hidden.to(self.preference_head[0].weight.dtype)).squeeze(-1)

    # ------------------------------------------------------------------ vision part
    def _grid_tensors(self, grid_thw: GridTHW, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (tuple(int(v) for v in grid_thw), str(device))
        cached = self._grid_cache.get(key)
        if cached is None:
            visual = self.model.visual
            grid = torch.tensor([key[0]], dtype=torch.long, device=device)
            with torch.no_grad():
                interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
                    grid,
                    num_grid_per_side=visual.num_grid_per_side,
                    mode=visual.interpolation_mode,
                    align_corners=visual.interpolation_align_corners,
                    spatial_merge_size=visual.spatial_merge_size,
                )
                rotary_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
            cached = (interp_indices, interp_weights, rotary_ids)
            self._grid_cache[key] = cached
        return cached

    def encode_frame(self, pixel_values: torch.Tensor, grid_thw: GridTHW) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision part for ONE frame.

        Args:
            pixel_values: [N, 1536] patch rows of the frame (robometer_ros.preprocess), N = t*h*w.
            grid_thw: the frame's patch grid (1, H/16, W/16), a Python tuple (constant for export).

        Returns:
            visual_embeds [N/4, H] (the frame's tokens for the language model) and
            deepstack_embeds [k, N/4, H] (features added after the first k decoder layers).
        """
        t, h, w = (int(v) for v in grid_thw)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != t * h * w:
            raise ValueError(
                f"pixel_values must be [{t * h * w}, {self.config.patch_dim}] for grid {grid_thw}, "
                f"got {list(pixel_values.shape)}"
            )
        visual = self.model.visual
        interp_indices, interp_weights, rotary_ids = self._grid_tensors((t, h, w), pixel_values.device)
        hidden = visual.patch_embed(pixel_values.to(visual.patch_embed.proj.weight.dtype))
        pos_embeds = (visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
        hidden = hidden + pos_embeds.to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, rotary_ids)
        deepstack = []
        for layer_num, block in enumerate(visual.blocks):
            hidden = hidden + self._frame_attention(block.attn, block.norm1(hidden), cos, sin)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if layer_num in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(layer_num)]
                deepstack.append(merger(hidden))
        visual_embeds = visual.merger(hidden)
        if deepstack:
            deepstack_embeds = torch.stack(deepstack, dim=0)
        else:
            deepstack_embeds = visual_embeds.new_zeros((0, *visual_embeds.shape))
        return visual_embeds, deepstack_embeds

    @staticmethod
    def _frame_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Vision self-attention over one frame: one segment, so no cu_seqlens split (.tolist()) is needed."""
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        return attn.proj(out.transpose(1, 2).reshape(n, -1))

    # ------------------------------------------------------------------ language part
    def _merge_visual(
        self, input_ids: torch.Tensor, visual_embeds: torch.Tensor, visual_index: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings with the visual rows gathered in at the visual positions: [1 or B, L, H].

        ``visual_embeds`` is [V, H] (one prompt) or [B, V, H] (a batch of prompts with one layout).
        """
        text_embeds = self.model.language_model.embed_tokens(input_ids)
        gathered = visual_embeds.index_select(-2, visual_index[0]).to(text_embeds.dtype)
        if gathered.dim() == 2:
            gathered = gathered.unsqueeze(0)
        return torch.where(visual_mask.unsqueeze(-1), gathered, text_embeds)

    def _decode(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        deepstack_embeds: torch.Tensor, visual_index: torch.Tensor, visual_mask: torch.Tensor,
        cache: _PrefixCache | None = None,
    ) -> torch.Tensor:
        """The decoder layers (deepstack features added at the visual positions after the first k) + final norm.

        ``deepstack_embeds`` is [k, V, H] for one prompt or [B, k, V, H] for a batch (``hidden`` [B, L, H]).
        """
        language = self.model.language_model
        batched = deepstack_embeds.dim() == 4
        index = visual_index[0]
        mask = visual_mask.unsqueeze(-1)
        position_embeddings = language.rotary_emb(hidden, position_ids)
        num_deepstack = deepstack_embeds.shape[1 if batched else 0]
        cache_kw = {_cache_keyword(type(language.layers[0]).forward): cache} if len(language.layers) else {}
        for layer_idx, layer in enumerate(language.layers):
            hidden = layer(
                hidden, attention_mask=attention_mask, position_embeddings=position_embeddings, position_ids=None,
                **cache_kw,
            )
            if layer_idx < num_deepstack:
                rows = deepstack_embeds[:, layer_idx] if batched else deepstack_embeds[layer_idx]
                extra = rows.index_select(-2, index).to(hidden.dtype)
                if not batched:
                    extra = extra.unsqueeze(0)
                hidden = hidden + torch.where(mask, extra, torch.zeros_like(extra))
        return language.norm(hidden)

    def forward_language(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        deepstack_embeds: torch.Tensor,
        visual_index: torch.Tensor,
        visual_mask: torch.Tensor,
        prog_positions: torch.Tensor,
        pref_position: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Language part + heads for one prompt (batch 1, causal, no padding), export-friendly.

        Args:
            input_ids: [1, L] int64 (visual positions hold the image-pad id; their embedding is replaced).
            position_ids: [3, 1, L] int64 M-RoPE ids (robometer_ros.model.prompt computes them).
            visual_embeds: [V, H] the frames' visual tokens concatenated in prompt order.
            deepstack_embeds: [k, V, H] the frames' deepstack features in the same order.
            visual_index: [1, L] int64 row of visual_embeds for each visual position, 0 elsewhere.
            visual_mask: [1, L] bool, True at visual positions.
            prog_positions: [F] int64 positions of the ``<|prog_token|>`` tokens.
            pref_position: optional [1] int64 position of the ``<|pref_token|>``.

        Returns:
            ``progress_logits`` [F, bins], ``success_logits`` [F], and ``preference_logit`` [1] when
            ``pref_position`` is given.
        """
        language = self.model.language_model
        hidden = self._merge_visual(input_ids, visual_embeds, visual_index, visual_mask)
        # Same mask construction as Qwen3VLTextModel.forward (position_ids [3, B, L] => no text positions).
        causal_mask = create_causal_mask(
            config=language.config, inputs_embeds=hidden, attention_mask=None, position_ids=None,
            **{_MASK_CACHE_KW: None},
        )
        hidden = self._decode(hidden, position_ids, causal_mask, deepstack_embeds, visual_index, visual_mask)

        frame_hidden = hidden[0].index_select(0, prog_positions)
        progress_logits, success_logits = self.apply_heads(frame_hidden)
        out = {"progress_logits": progress_logits, "success_logits": success_logits}
        if pref_position is not None:
            out["preference_logit"] = self.apply_preference_head(hidden[0].index_select(0, pref_position))
        return out

    # ------------------------------------------------------------------ prefix reuse
    def forward_prefix(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        deepstack_embeds: torch.Tensor,
        visual_index: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The prompt prefix that every step of an episode shares: chat text + instruction + the first frame
        + its ``<|prog_token|>`` (the last prefix token). Same computation as the first P positions of
        ``forward_language`` (causal attention: nothing later can change them).

        Args:
            input_ids, position_ids, visual_index, visual_mask: the first P positions of the full layout
                (``robometer_ros.model.prompt.split_after_first_frame``); [1, P] / [3, 1, P].
            visual_embeds: [T, H] the first frame's visual tokens; deepstack_embeds: [k, T, H].

        Returns:
            ``progress_logits`` [1, bins] and ``success_logits`` [1] of the first frame (its prog token is the
            last prefix position), ``past_keys`` / ``past_values`` [layers, 1, kv_heads, P, head_dim]: every
            layer's keys (after k_norm and M-RoPE) and values, for ``forward_suffix``.
        """
        language = self.model.language_model
        hidden = self._merge_visual(input_ids, visual_embeds, visual_index, visual_mask)
        causal_mask = create_causal_mask(
            config=language.config, inputs_embeds=hidden, attention_mask=None, position_ids=None,
            **{_MASK_CACHE_KW: None},
        )
        cache = _PrefixCache()
        hidden = self._decode(hidden, position_ids, causal_mask, deepstack_embeds, visual_index, visual_mask, cache)
        progress_logits, success_logits = self.apply_heads(hidden[:, -1])  # [1, H]: batch 1, the last position
        return {
            "progress_logits": progress_logits,
            "success_logits": success_logits,
            "past_keys": torch.stack(cache.keys, dim=0),
            "past_values": torch.stack(cache.values, dim=0),
        }

    def forward_suffix(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        deepstack_embeds: torch.Tensor,
        visual_index: torch.Tensor,
        visual_mask: torch.Tensor,
        prog_positions: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The rest of the prompt on top of a prefix's keys/values, for B prompts that share the prefix and
        the token layout (they differ only in their frames' features).

        Args:
            input_ids: [1, S] the tokens after the prefix; position_ids: [3, 1, S] their M-RoPE ids (they
                continue the prefix's: the slice of the full layout's ids).
            visual_embeds: [B, V, H] each prompt's suffix frames' visual tokens; deepstack_embeds: [B, k, V, H].
            visual_index: [1, S] row of the suffix features at each visual position; visual_mask: [1, S].
            prog_positions: [F-1] positions (within the suffix) of the other frames' ``<|prog_token|>``.
            past_keys, past_values: ``forward_prefix``'s [layers, 1, kv_heads, P, head_dim].

        Returns:
            ``progress_logits`` [B, F-1, bins] and ``success_logits`` [B, F-1]. Suffix position i attends
            to the P prefix positions and to suffix positions <= i: the causal mask of the full prompt.
        """
        hidden = self._merge_visual(input_ids, visual_embeds, visual_index, visual_mask)
        past_length, length = past_keys.shape[3], input_ids.shape[1]
        key_positions = torch.arange(past_length + length, device=hidden.device)
        query_positions = torch.arange(length, device=hidden.device) + past_length
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None]  # [1, 1, S, P + S]
        # additive, not boolean: the ONNX export of SDPA with a boolean mask adds a NaN guard over the whole
        # [B, heads, S, P + S] attention (no row here is fully masked: every query sees the prefix)
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        attention_mask = torch.where(allowed, zero, torch.finfo(hidden.dtype).min)
        cache = _PrefixCache(past_keys, past_values)
        hidden = self._decode(hidden, position_ids, attention_mask, deepstack_embeds, visual_index, visual_mask,
                              cache)
        progress_logits, success_logits = self.apply_heads(hidden.index_select(1, prog_positions))
        return {"progress_logits": progress_logits, "success_logits": success_logits}

    # ------------------------------------------------------------------ reference path
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        prog_positions: torch.Tensor,
        pref_position: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The reference method: the standard Qwen3VLModel forward over all frames, heads at the prog tokens.

        Args:
            input_ids: [1, L] with the image-pad tokens expanded (one run per frame).
            pixel_values: [sum N_i, 1536] patch rows of all frames, in prompt order.
            image_grid_thw: [F_images, 3] grid of each image.
            mm_token_type_ids: [1, L] 0 text / 1 image (transformers 5.x needs it for M-RoPE).
            prog_positions: [F] positions of the ``<|prog_token|>`` tokens.
            pref_position: optional [1] position of the ``<|pref_token|>``.
            attention_mask: optional [1, L]; None means all ones.
            position_ids: optional precomputed M-RoPE ids; None lets the backbone compute them.

        Returns:
            The same dict as ``forward_language`` plus ``hidden_states`` [1, L, H] (final, post-norm).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        )
        # The official code reads outputs.hidden_states[-1] with output_hidden_states=True; in transformers
        # >= 4.55 that entry is the final-norm output, i.e. last_hidden_state.
        hidden = outputs.last_hidden_state
        self.model.rope_deltas = None  # the backbone caches these for generation; we never generate
        frame_hidden = hidden[0].index_select(0, prog_positions.to(hidden.device))
        progress_logits, success_logits = self.apply_heads(frame_hidden)
        out = {"progress_logits": progress_logits, "success_logits": success_logits, "hidden_states": hidden}
        if pref_position is not None:
            out["preference_logit"] = self.apply_preference_head(
                hidden[0].index_select(0, pref_position.to(hidden.device))
            )
        return out

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def expected_progress(progress_logits: torch.Tensor) -> torch.Tensor:
        """C51 expectation of the progress bins (see robometer_ros.model.heads.expected_progress)."""
        return expected_progress(progress_logits)

    def extra_repr(self) -> str:
        cfg: Any = self.config
        return f"hidden={cfg.hidden_size}, bins={cfg.num_bins}, frames={cfg.num_frames}"
