"""Score token rows with a transformers causal LM in plain PyTorch (docs/design.md sections 3.6 and 7).

One `TorchScorer.score` call, for every sequence:

1. Length-sorted batches under a token budget: sequences are sorted by length
   (longest first, stable) and packed greedily so that
   `batch_size * max_len <= batch_tokens` (padded tokens per forward) and the
   pad tokens stay under `max_padding` (10%) of the real tokens; a sequence
   longer than the budget goes alone. Right padding and explicit position ids
   0..n-1. No attention_mask is passed: under causal attention a real token
   only attends to earlier positions, and every pad comes after the row's
   last real token, so the pads are invisible to real tokens without one (the
   hidden states of real tokens are bit-identical with and without the mask
   on SmolLM2), while the mask would force the slower masked attention kernel
   (12% slower forward at 2 x 1024 tokens on CPU; 23% of a 4 x 2048 batch's
   CPU time was masked attention). Pad positions produce hidden states that are
   never read.
2. One forward of the *decoder* (`model.get_decoder()`, e.g. `LlamaModel`),
   which returns hidden states [B, L, H]; the [B, L, V] logits are never built.
3. Only the positions whose *next* token is a completion token need a
   log-prob: their hidden states are gathered (prompt positions never reach
   the lm_head), then in chunks of `vocab_chunk_tokens` positions:
   `logits = lm_head(h_chunk).float()` (then the model's final logit
   softcapping, if any, as Gemma does), and per policy
   `logprob = logits[target] / tau - logsumexp(logits / tau)` (renormalized
   over the top-p nucleus for top_p < 1; see `sampling.py`). This step holds
   two float32 [vocab_chunk_tokens, V] tensors at a time, whatever the batch
   size; the rest of the peak is the decoder's own activations.
4. Every policy is computed from the same logits chunk: one forward serves the
   target at T=1 and a behavior at T=0.7 of the same model.

Numerics: float32 weights on CPU; on CUDA use bfloat16 weights (`scoring_dtype`)
and the log-softmax still runs in float32. Results are deterministic for a
given device, inputs and batch settings (same bits run to run). Padding and
batch composition change the matmul shapes and therefore float rounding: on
the embedded SmolLM2 in float32, log-probs of GSM8K rows scored in one padded
batch differ from the same rows scored one by one by up to 4.3e-5 (log-probs
down to -21). Scored one by one, they are within 4e-6 of a float64
log-softmax of the model's logits (torch's own float32 log_softmax is 3e-5
off). tests/test_scoring.py pins < 1e-4 against the naive full-softmax
forward and < 1e-5 against float64.

At construction the scorer checks on an 8-token input that decoder + lm_head
(+ softcapping) reproduces the model's own logits, so a model family that
scales its logits some other way (not mirrored here) fails loudly instead of
producing wrong log-probs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pear_data.scoring.sampling import SamplingParams, token_logprobs

ProgressCallback = Callable[[int, int], None]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" if a CUDA device is available, else "cpu"; any other value is checked and returned.

    Raises ValueError for an unknown device string or for "cuda" without a CUDA device.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device: use --device cpu (or auto)")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported by the torch scoring backend: use cpu or cuda")
    return device


def scoring_dtype(device: str) -> torch.dtype:
    """The weight dtype to load a model in for scoring on `device`: float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(resolve_device(device)).type == "cuda" else torch.float32


def model_flops_per_token(model: torch.nn.Module) -> int:
    """Forward FLOPs per token counted as 2 x the decoder's non-embedding parameters.

    Counts every parameter of `model.get_decoder()` except the input token
    embedding table (so: attention and MLP projections and norm weights); the
    lm_head is not counted, since the scorer applies it to completion positions
    only (2 x hidden x vocab FLOPs per scored token), and neither is the
    attention-score work that grows with sequence length. For the embedded
    SmolLM2-135M: 2 x 106.2M = 212.4 MFLOP per token.
    """
    decoder = model.get_decoder()
    embedding = model.get_input_embeddings()
    embedding_ids = {id(p) for p in embedding.parameters()}
    params = sum(p.numel() for p in decoder.parameters() if id(p) not in embedding_ids)
    return 2 * params


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float = 0.1) -> list[np.ndarray]:
    """Group sequence indices into padded batches: batch_size * max_len <= batch_tokens.

    Longest first (a stable sort, so equal lengths keep input order), filled
    greedily; a batch is closed early when adding the next (shorter) sequence
    would make its pad tokens exceed `max_padding` x its real tokens, so a
    small or very mixed input is not padded to its longest row. A sequence
    longer than `batch_tokens` is a batch of its own. Returns int64 index
    arrays into `lengths`; every index appears exactly once.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    lengths_array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths_array, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        max_len = max(int(lengths_array[order[start]]), 1)
        stop, real = start + 1, max_len
        while stop < len(order) and (stop - start + 1) * max_len <= batch_tokens:
            candidate = real + int(lengths_array[order[stop]])
            if (stop - start + 1) * max_len > (1.0 + max_padding) * candidate:
                break
            stop, real = stop + 1, candidate
        batches.append(order[start:stop])
        start = stop
    return batches


class TorchScorer:
    """Per-token log-probs of a transformers causal LM, batched and chunked (see the module docstring).

    model: a loaded `PreTrainedModel` for causal LM, already on `device` in its
    scoring dtype (`scoring_dtype(device)`), e.g. from `pear_data.models.load_model`.
    It is put in eval mode. device: "cpu", "cuda", "cuda:N" or "auto".
    batch_tokens: padded tokens per forward (batch_size * max_len).
    vocab_chunk_tokens: positions per lm_head + log-softmax chunk; the scorer's
    extra memory is about 2 x vocab_chunk_tokens x vocab x 4 bytes (100 MB for
    SmolLM2's 49k vocabulary at 256, 540 MB for Gemma-3's 262k). 256 rows keep
    the lm_head matmul efficient; 1024 measured no faster on CPU and raised the
    peak at 2048-token rows from +254 to +389 MiB (bench/score_throughput.py).
    max_padding: a batch stops taking shorter rows when its pad tokens would
    exceed this fraction of its real tokens (`plan_batches`); math.inf fills
    every batch up to `batch_tokens`.
    progress: called after every batch with (rows_done, tokens_done), cumulative
    within the current `score` call; tokens are real (unpadded) tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str = "cpu",
        batch_tokens: int = 8192,
        vocab_chunk_tokens: int = 256,
        max_padding: float = 0.1,
        progress: ProgressCallback | None = None,
    ) -> None:
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if vocab_chunk_tokens < 1:
            raise ValueError(f"vocab_chunk_tokens must be >= 1, got {vocab_chunk_tokens}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0, got {max_padding}")
        self.device = torch.device(resolve_device(device))
        weights_device = next(model.parameters()).device
        if weights_device.type != self.device.type or (
            self.device.index is not None and weights_device.index != self.device.index
        ):
            raise ValueError(
                f"the model's weights are on {weights_device} but scoring was asked on {self.device}: "
                f"load the model on {self.device} (pear_data.models.load_model(source, device=...))"
            )
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): it is not a causal LM")
        text_config = model.config.get_text_config()
        self.final_logit_softcapping: float | None = getattr(text_config, "final_logit_softcapping", None)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.batch_tokens = batch_tokens
        self.vocab_chunk_tokens = vocab_chunk_tokens
        self.max_padding = max_padding
        self.progress = progress
        self._check_logits_path()

    # ------------------------------------------------------------------ public

    def score(
        self,
        sequences: list[np.ndarray],
        completion_masks: list[np.ndarray],
        policies: list[SamplingParams],
    ) -> list[list[np.ndarray]]:
        """Per-token log-probs of every sequence under every policy, from one forward per batch.

        sequences[r]: integer [n_r] token ids; completion_masks[r]: [n_r] 0/1
        (int8 or bool). Returns out[p][r], float32 [n_r]: out[p][r][i] =
        log q_p(sequences[r][i] | sequences[r][:i]) where completion_masks[r][i]
        == 1 and i >= 1, and 0.0 elsewhere (position 0 has no context and is
        always 0.0). q_p is the sampling distribution of policies[p]
        (temperature, top-p; -inf for a token outside the nucleus). Results are
        in input order.
        """
        if not policies:
            raise ValueError("policies is empty: pass at least one SamplingParams (the target is SamplingParams())")
        self._validate(sequences, completion_masks)
        outputs = [[np.zeros(len(seq), dtype=np.float32) for seq in sequences] for _ in policies]
        lengths = [len(seq) for seq in sequences]
        rows_done = tokens_done = 0
        with torch.inference_mode():
            for rows in plan_batches(lengths, self.batch_tokens, self.max_padding):
                batch_logprobs = self._score_batch([sequences[r] for r in rows],
                                                   [completion_masks[r] for r in rows], policies)
                for p, per_row in enumerate(batch_logprobs):
                    for r, (positions, values) in zip(rows, per_row):
                        outputs[p][r][positions] = values
                rows_done += len(rows)
                tokens_done += sum(lengths[r] for r in rows)
                if self.progress is not None:
                    self.progress(rows_done, tokens_done)
        return outputs

    # ------------------------------------------------------------------ internals

    def _validate(self, sequences: list[np.ndarray], completion_masks: list[np.ndarray]) -> None:
        if len(sequences) != len(completion_masks):
            raise ValueError(f"{len(sequences)} sequences but {len(completion_masks)} completion masks")
        for r, (seq, mask) in enumerate(zip(sequences, completion_masks)):
            seq = np.asarray(seq)
            mask = np.asarray(mask)
            if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
                raise ValueError(f"row {r}: input_ids must be a 1-D integer array, got {seq.dtype} {seq.shape}")
            if mask.shape != seq.shape:
                raise ValueError(f"row {r}: completion_mask has shape {mask.shape}, input_ids {seq.shape}")
            if len(seq) and (seq.min() < 0 or seq.max() >= self.vocab_size):
                raise ValueError(
                    f"row {r}: token id {int(seq.max() if seq.max() >= self.vocab_size else seq.min())} is outside "
                    f"the model's vocabulary [0, {self.vocab_size}): was the row tokenized with another tokenizer?"
                )

    def _score_batch(
        self, sequences: list[np.ndarray], masks: list[np.ndarray], policies: list[SamplingParams]
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Score one padded batch; returns per policy, per row, (positions, float32 values)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        max_len = int(lengths.max()) if len(lengths) else 0
        ids = np.zeros((len(sequences), max_len), dtype=np.int64)  # pad id 0: any valid id, never attended to
        scored = np.zeros((len(sequences), max_len), dtype=bool)  # position i's token gets a log-prob
        for b, (seq, mask) in enumerate(zip(sequences, masks)):
            ids[b, : len(seq)] = seq
            scored[b, 1 : len(seq)] = np.asarray(mask[1:]) != 0
        # (b, i) with scored[b, i], in row-major order: hidden state at i - 1 predicts token i.
        rows_index, positions = np.nonzero(scored)
        if len(positions) == 0:
            return [[(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in sequences] for _ in policies]

        input_ids = torch.from_numpy(ids).to(self.device)
        position_ids = torch.arange(max_len, device=self.device).expand(len(sequences), max_len)
        # No attention_mask: with right padding, causal attention already keeps every real token from
        # seeing the pads (they come after it), and the unmasked causal kernel is the fast one.
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        flat_predictor = torch.from_numpy(rows_index * max_len + positions - 1).to(self.device)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_predictor)  # [T, H]
        targets = input_ids.reshape(-1).index_select(0, flat_predictor + 1)  # [T]

        values = [torch.empty(len(positions), dtype=torch.float32, device=self.device) for _ in policies]
        for start in range(0, len(positions), self.vocab_chunk_tokens):
            stop = min(start + self.vocab_chunk_tokens, len(positions))
            logits = self._logits(hidden[start:stop])
            for p, params in enumerate(policies):
                values[p][start:stop] = token_logprobs(logits, targets[start:stop], params)
            del logits

        splits = np.cumsum(np.bincount(rows_index, minlength=len(sequences)))[:-1]
        row_positions = np.split(positions, splits)
        result = []
        for p in range(len(policies)):
            row_values = np.split(values[p].cpu().numpy(), splits)
            result.append(list(zip(row_positions, row_values)))
        return result

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [C, V] logits of hidden states [C, H], as the model's causal-LM head computes them.

        Softcapping is applied after the cast to float32 (transformers applies
        it in the model dtype; identical in float32, more precise in bf16).
        """
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcapping is not None:
            cap = float(self.final_logit_softcapping)
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _check_logits_path(self) -> None:
        """Raise if decoder -> lm_head (-> softcap) does not reproduce model(input_ids).logits."""
        ids = (torch.arange(8, device=self.device) * 7 + 3) % self.vocab_size
        with torch.inference_mode():
            reference = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
            hidden = self.decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
            ours = self._logits(hidden)
        scale = max(1.0, float(reference.abs().max()))
        tolerance = 1e-4 if self.lm_head.weight.dtype == torch.float32 else 2e-2
        diff = float((ours - reference).abs().max())
        if not diff <= tolerance * scale:
            raise ValueError(
                f"{type(self.model).__name__}: hidden states -> lm_head"
                f"{' -> softcapping' if self.final_logit_softcapping else ''} differs from the model's own logits "
                f"by {diff:.3g} (logits up to {scale:.3g}); this model family post-processes its logits in a way "
                "the torch scorer does not mirror, so its log-probs would be wrong. Please report the model."
            )
