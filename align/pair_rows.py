"""One row per preference pair: the prompt is computed once for chosen and rejected.

TRL's DPOTrainer runs each pair as two rows, prompt + chosen and prompt + rejected, each padded
to the longer, and projects every position of both through the output layer (on devices without
Triton). Here each pair is one row, prompt + chosen + rejected, with an attention mask that keeps
rejected from seeing chosen and position ids that restart rejected where the prompt ends, so it
reads exactly the context it reads in its own row. Only the positions that predict a response
token go through the output layer. The log-probs come back in TRL's two-row layout, so its loss
code (every loss type, every metric) runs unchanged on them; they equal the two-row log-probs up
to float rounding (tests/test_pair_rows.py).

Installed on the model's forward (`install`): a call that is not a DPO batch of pairs sharing
their prompts, or a model this does not cover, goes to TRL's own forward.

`share_prefixes` is the same packing for any batch of paired rows, mapped back position by
position: `align rm` runs a preference pair as one row the same way (a score at each side's last
token), and `align prm --pairwise` a pair of sibling solutions (their shared steps computed once too).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

# Decoder families whose forward takes position ids and a ready 4-D attention mask as given, with
# no sliding window or logit scaling to honour. Others keep TRL's two-row forward.
FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite"}
SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def supported(model) -> bool:
    """Whether this model's pairs can share one row (see FAMILIES)."""
    config = model.config
    if config.model_type not in FAMILIES or getattr(config, "_attn_implementation", "sdpa") not in {"sdpa", "eager"}:
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in SCALED)


@dataclass
class PairRows:
    """A batch of pairs as one row each, and where each response token's log-prob comes from."""

    input_ids: torch.Tensor  # (B, N)
    position_ids: torch.Tensor  # (B, N)
    allowed: torch.Tensor  # (B, 1, N, N) bool: query q may attend to key k
    source: tuple[torch.Tensor, torch.Tensor]  # (row, index) in the packed batch of the hidden state predicting ...
    target: tuple[torch.Tensor, torch.Tensor]  # ... (row, position - 1) of TRL's (2B, T - 1) log-prob layout
    tokens: torch.Tensor  # the predicted token ids, in the same order


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int) -> PairRows | None:
    """TRL's batch (chosen rows, then rejected rows; right-padded; labels -100 outside responses)
    as one row per pair, or None when it is not such a batch (odd rows, differing prompts, an
    empty prompt or response, a gap in a response)."""
    rows = input_ids.size(0)
    if rows % 2 or attention_mask is None or attention_mask.dim() != 2:
        return None
    pairs = rows // 2
    lengths = attention_mask.sum(1).tolist()
    scored = labels != -100
    starts = scored.int().argmax(1).tolist()  # the first response position (0 when none: refused below)
    counts = scored.sum(1).tolist()
    segments, packed_ids, positions = [], [], []
    source_row, source_index, target_row, target_index, tokens = [], [], [], [], []
    for i in range(pairs):
        c, r = i, i + pairs
        p, lc, lr = starts[c], lengths[c], lengths[r]
        if (p < 1 or starts[r] != p or counts[c] != lc - p or counts[r] != lr - p or lc <= p or lr <= p
                or not torch.equal(input_ids[c, :p], input_ids[r, :p])):
            return None
        packed_ids.append(torch.cat([input_ids[c, :lc], input_ids[r, p:lr]]))
        positions.append(torch.cat([torch.arange(lc), torch.arange(p, lr)]))
        segments.append(torch.tensor([0] * p + [1] * (lc - p) + [2] * (lr - p)))
        # chosen token t is predicted from packed index t - 1 (chosen sits where it sat in its own row);
        # rejected token t from the prompt's last token when t == p, else from packed index lc + t - 1 - p
        chosen_t = torch.arange(p, lc)
        rejected_t = torch.arange(p, lr)
        source_row += [i] * ((lc - p) + (lr - p))
        source_index += (chosen_t - 1).tolist() + torch.where(rejected_t == p, p - 1, lc + rejected_t - 1 - p).tolist()
        target_row += [c] * (lc - p) + [r] * (lr - p)
        target_index += (chosen_t - 1).tolist() + (rejected_t - 1).tolist()
        tokens.append(torch.cat([input_ids[c, p:lc], input_ids[r, p:lr]]))
    device = input_ids.device
    ids, pos, allowed = padded(packed_ids, positions, segments, pad_id, device)
    as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PairRows(ids, pos, allowed, (as_index(source_row), as_index(source_index)),
                    (as_index(target_row), as_index(target_index)), torch.cat(tokens).to(device))


def padded(rows: list[torch.Tensor], positions: list[torch.Tensor], segments: list[torch.Tensor], pad_id: int, device):
    """Packed rows right-padded into (ids, position ids, segment_mask) on `device`."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=rows[0].dtype)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for n, (row, at, kind) in enumerate(zip(rows, positions, segments)):
        ids[n, :len(row)], pos[n, :len(row)], seg[n, :len(row)] = row.cpu(), at, kind
    return ids.to(device), pos.to(device), segment_mask(seg.to(device))


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, N) bool, query q may attend to key k, from (B, N) segments: 0 the shared part, 1 and 2
    each side's own tokens, -1 padding. Causal; a side sees the shared part and itself, never the other."""
    width = segments.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)  # padding attends to itself: no empty softmax row
    return allowed[:, None]


def for_attention(model, allowed: torch.Tensor) -> torch.Tensor:
    """segment_mask as the model's attention takes it: as it is for sdpa, additive for eager."""
    if model.config._attn_implementation != "eager":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class SharedPrefixes:
    """A batch's pairs of rows one row each (see share_prefixes), and where each position of the
    two-row batch sits in it."""

    input_ids: torch.Tensor  # (R, N)
    position_ids: torch.Tensor  # (R, N)
    allowed: torch.Tensor  # (R, 1, N, N) bool: query q may attend to key k
    source: tuple[torch.Tensor, torch.Tensor]  # (B, T) each: the packed (row, index) of two-row position (b, t)


def share_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, partners: dict[int, int], pad_id: int) -> SharedPrefixes:
    """A right-padded batch with each pair of rows (`partners`: first row -> second row) as one row:
    the tokens the two share from the start, the rest of the first, then the rest of the second,
    which attends to the shared part and itself only and is positioned where it sits in its own row;
    every other row as it is. A DPO pair shares its prompt, a PRM's siblings their earlier steps too."""
    lengths = attention_mask.sum(1).tolist()
    seconds = set(partners.values())
    rows, index = input_ids.size(0), torch.arange(input_ids.size(1))
    source_row, source_index = torch.zeros_like(input_ids, device="cpu"), index.repeat(rows, 1)
    packed, positions, segments = [], [], []
    for b in range(rows):
        if b in seconds:
            continue
        first, n = input_ids[b, :lengths[b]], len(packed)
        source_row[b] = n
        if b not in partners:
            packed.append(first)
            positions.append(torch.arange(len(first)))
            segments.append(torch.zeros(len(first), dtype=torch.long))
            continue
        c = partners[b]
        second = input_ids[c, :lengths[c]]
        common = min(len(first), len(second)) - 1  # each keeps a token of its own
        differ = (first[:common] != second[:common]).nonzero()
        shared = int(differ[0]) if len(differ) else common
        packed.append(torch.cat([first, second[shared:]]))
        positions.append(torch.cat([torch.arange(len(first)), torch.arange(shared, len(second))]))
        segments.append(torch.tensor([0] * shared + [1] * (len(first) - shared) + [2] * (len(second) - shared)))
        source_row[c] = n
        # the second row's own tokens sit after the first's; its padding maps anywhere (never read)
        source_index[c] = torch.where(index < shared, index, (index + len(first) - shared).clamp(max=len(packed[-1]) - 1))
    # every packed row is at least as long as the rows it holds, so each (row, index) is inside the packed batch
    device = input_ids.device
    return SharedPrefixes(*padded(packed, positions, segments, pad_id, device), (source_row.to(device), source_index.to(device)))


def install(model, outputs: tuple[str, ...]) -> bool:
    """Route `model(..., labels=, fused_lm_head=True)` calls on DPO batches through one row per
    pair; anything else goes to the forward TRL installed. Returns whether it was installed."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput, _CHUNKED_LOGPROB_CHUNK_SIZE

    if not supported(model):
        return False
    fallback = model.forward
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        rows = None
        # PEFT passes inputs_embeds, return_dict and the like as None; anything else set is not TRL's pair batch
        other = {k for k, v in kwargs.items() if v is not None and k not in {"input_ids", "attention_mask", "use_cache"}}
        if fused_lm_head and not args and not other and labels is not None and input_ids is not None:
            rows = pack(input_ids, mask, labels, pad_id)
        if rows is None:
            return fallback(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        hidden = self.base_model(input_ids=rows.input_ids, attention_mask=for_attention(self, rows.allowed), position_ids=rows.position_ids,
                                 use_cache=False).last_hidden_state
        head = self.get_output_embeddings()
        picked = hidden[rows.source].to(head.weight.device)
        per_token = ChunkedLogProbFunction.apply(picked, head.weight, head.bias, rows.tokens.to(head.weight.device), 1.0,
                                                 _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        shape = (input_ids.size(0), input_ids.size(1) - 1)
        label_mask = torch.zeros(shape, dtype=torch.bool, device=picked.device)
        label_mask[rows.target] = True
        # index_put into zeros keeps every value connected to the graph, as TRL's masked_scatter does
        fields = [None if x is None else x.new_zeros(shape).index_put(rows.target, x) for x in per_token]
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = fields
        loss = -log_probs.sum() / label_mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=label_mask)

    model.forward = types.MethodType(forward, model)
    return True
