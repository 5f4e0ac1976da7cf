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
   on SmolLM2), while the mask would force the slower masked attention
   kernel. Pad positions produce hidden states that are never read.
2. One forward of the *decoder* (`model.get_decoder()`, e.g. `LlamaModel`),
   which returns hidden states [B, L, H]; the [B, L, V] logits are never built.
3. Only the positions whose *next* token is a completion token need a
   log-prob: their hidden states are gathered (prompt positions never reach
   the lm_head), then in chunks of `vocab_chunk_tokens` positions:
   `logits = lm_head(h_chunk)` as float32 (then the model's final logit
   softcapping, if any, as Gemma does), and for every policy
   `logprob = logits[target] / tau - logsumexp(logits / tau)` (renormalized
   over the top-p nucleus for top_p < 1), all policies from the same chunk
   with the policy-independent passes done once (`sampling.policy_logprobs`).
   This step holds two float32 [vocab_chunk_tokens, V] buffers, allocated
   once per `score` call and reused by every chunk, whatever the batch size;
   the rest of the peak is the decoder's own activations.
4. Every policy is computed from the same logits chunk: one forward serves the
   target at T=1 and a behavior at T=0.7 of the same model.
5. The per-token results stay on the device until the end of the `score`
   call, then come back in one copy: on CUDA nothing in a batch waits for the
   GPU (inputs go up from pinned memory without blocking), except the top-p
   nucleus search, which asks once per chunk whether every row is resolved.

Numerics: float32 weights on CPU; on CUDA use bfloat16 weights (`scoring_dtype`)
and the log-softmax still runs in float32. On CUDA a plain bias-free
`nn.Linear` head in bfloat16 is multiplied with float32 output
(`torch.mm(..., out_dtype=torch.float32)`, products accumulated in float32
and never rounded to bfloat16), where `model(ids).logits` rounds every logit
to bfloat16 first; other heads, and torch builds without that overload, use
`lm_head(h).float()`. Results are deterministic for a
given device, inputs and batch settings (same bits run to run; on CPU also
whatever the thread count, under MKL's reproducible mode, which the CLI sets).
Padding and batch composition change the matmul shapes and therefore float
rounding: the same row scored in another batch differs in the last bits of
float32. tests/test_scoring.py pins < 1e-4 against the naive full-softmax
forward and < 1e-5 against a float64 log-softmax, row by row.

At construction the scorer checks on an 8-token input that decoder + lm_head
(+ softcapping) reproduces the model's own logits, so a model family that
scales its logits some other way (not mirrored here) fails loudly instead of
producing wrong log-probs.

Optional fused head (`fused_head=True`, CUDA with liger-kernel installed;
not run in this project's CPU-only tests): when every policy has top_p == 1
and the model has no final-logit softcapping, liger-kernel's fused linear +
cross-entropy (`reduction="none"`) gives each token's log-prob without
materializing a logits chunk; a temperature is applied by dividing the hidden
states (and bias) by tau before the head. Its matmul produces bfloat16
logits, so it is less precise than the chunked path above on bfloat16 weights,
and it syncs with the host once per batch (it counts the non-ignored
targets). Any other call uses the chunked path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pear_data.config import SamplingParams
from pear_data.errors import ModelSpecError, UsageError
from pear_data.scoring.sampling import STRATEGIES, policy_logprobs

ProgressCallback = Callable[[int, int], None]

# Padded tokens per decoder forward, and positions per lm_head + log-softmax chunk, by device type.
# CPU: 8192 / 256 (bench/score_throughput.py). CUDA: larger, so that every matmul is large and the
# per-chunk kernel launches are amortized; a [1024, V] float32 chunk is 0.6 GB at V = 152k, 1.1 GB at 262k.
_DEFAULT_BATCH_TOKENS = {"cpu": 8192, "cuda": 32768}
_DEFAULT_VOCAB_CHUNK_TOKENS = {"cpu": 256, "cuda": 1024}


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


def check_device(device: str, workers: int = 1) -> None:
    """UsageError unless torch can score on `device` with `workers` worker processes: a CUDA index below the GPU
    count, and for several workers on CUDA one GPU each (`--device cuda`, at least `workers` GPUs)."""
    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--device {device}: {exc}") from None
    parsed = torch.device(resolved)
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.index is not None and parsed.type == "cuda" and parsed.index >= count:
        raise UsageError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                         "pick one of them, or --device cuda")
    if workers > 1 and parsed.type == "cuda":
        if parsed.index is not None:
            raise UsageError(f"--device {device} names one GPU; --workers {workers} needs --device cuda (one GPU each)")
        if workers > count:
            raise UsageError(f"--workers {workers} needs {workers} GPUs, this machine has {count}")


def scoring_dtype(device: str) -> torch.dtype:
    """The weight dtype to load a model in for scoring on `device`: float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(resolve_device(device)).type == "cuda" else torch.float32


def default_batch_tokens(device: str) -> int:
    """The default padded-token budget per forward on `device` ("cpu", "cuda", "cuda:N", "auto"): 8192 on CPU,
    32768 on CUDA. A device named by type needs no such device here (a Ray driver plans for the cluster's GPUs)."""
    return _DEFAULT_BATCH_TOKENS[_device_type(device)]


def default_vocab_chunk_tokens(device: str) -> int:
    """The default positions per lm_head + log-softmax chunk on `device`: 256 CPU, 1024 CUDA."""
    return _DEFAULT_VOCAB_CHUNK_TOKENS[_device_type(device)]


def _device_type(device: str) -> str:
    return torch.device(resolve_device(device) if device == "auto" else device).type


def model_flops_per_token(model: torch.nn.Module) -> int:
    """Forward FLOPs per token counted as 2 x the decoder's non-embedding parameters.

    Counts every parameter of `model.get_decoder()` except the input token
    embedding table (so: attention and MLP projections and norm weights); the
    lm_head is not counted, since the scorer applies it to completion positions
    only (2 x hidden x vocab FLOPs per scored token), and neither is the
    attention-score work that grows with sequence length: `scoring_flops`
    counts both. For the embedded SmolLM2-135M: 2 x 106.2M = 212.4 MFLOP per
    token.
    """
    decoder = model.get_decoder()
    embedding = model.get_input_embeddings()
    embedding_ids = {id(p) for p in embedding.parameters()}
    params = sum(p.numel() for p in decoder.parameters() if id(p) not in embedding_ids)
    return 2 * params


@dataclass(frozen=True)
class FlopCounts:
    """The forward FLOPs that scoring needs, per token (`scoring_flops`); MFU = counted FLOP/s / peak FLOP/s.

    dense_per_token: 2 x the decoder's non-embedding parameters (every token).
    head_per_scored_token: 2 x hidden x vocab, the lm_head, for a *scored*
    token only (a completion position; prompt positions never reach the head).
    attention_per_token_per_position: 4 x layers x attention width (heads x
    head_dim): QK^T and AV, 2 FLOPs per multiply-add, per token per attended
    position; a causal row of n tokens attends to n^2 / 2 positions in all.
    """

    dense_per_token: int
    head_per_scored_token: int
    attention_per_token_per_position: int

    def row(self, length: int, scored: int) -> float:
        """FLOPs of one row: length x dense + scored x head + 4 L d x length^2 / 2 (causal halved)."""
        return (length * self.dense_per_token + scored * self.head_per_scored_token
                + self.attention_per_token_per_position * length * length / 2)

    def total(self, lengths: Sequence[int], scored: Sequence[int]) -> float:
        """FLOPs of rows of `lengths` tokens with `scored` scored tokens each."""
        return float(sum(self.row(int(n), int(s)) for n, s in zip(lengths, scored, strict=True)))


def scoring_flops(model: torch.nn.Module) -> FlopCounts:
    """The FLOP counts of scoring with `model` (see `FlopCounts`), honest for MFU.

    Per token: 2 x non-embedding decoder parameters; per scored token:
    2 x hidden x vocab for the head; attention: 4 x layers x seq x width per
    token, halved for causal attention. Not counted: norms' and activations'
    elementwise work, the softmaxes. Sliding-window layers are counted with
    their full causal context, an over-count for models that have them.
    Padding is not useful work and is never counted: pass the real lengths.
    """
    config = model.config.get_text_config()
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab, hidden = model.get_output_embeddings().weight.shape
    return FlopCounts(
        dense_per_token=model_flops_per_token(model),
        head_per_scored_token=2 * int(hidden) * int(vocab),
        attention_per_token_per_position=4 * int(config.num_hidden_layers) * heads * int(head_dim),
    )


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


@dataclass
class _BatchResult:
    """One scored batch, its values still on the device: (rows[b], positions[j]) gets values[p][j]."""

    rows: np.ndarray  # input index of each row of the batch
    row_of: np.ndarray  # [T] batch row of each scored position, row-major order
    positions: np.ndarray  # [T] token position within its row
    values: list[torch.Tensor]  # per policy, float32 [T] on the device


class _ChunkBuffers:
    """The two float32 [rows, V] buffers of the chunked head (logits, scratch), reused by every chunk of a call."""

    def __init__(self, device: torch.device, vocab: int) -> None:
        self.device, self.vocab = device, vocab
        self.logits = self.scratch = torch.empty(0, vocab, dtype=torch.float32, device=device)

    def get(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.logits.shape[0] < rows:
            self.logits = self.scratch = None  # release before allocating the larger pair
            self.logits = torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device)
            self.scratch = torch.empty(rows, self.vocab, dtype=torch.float32, device=self.device)
        return self.logits[:rows], self.scratch[:rows]


class ScoringStopped(Exception):
    """`TorchScorer.score` was told to stop (its `stop` event is set): the run is being cancelled."""


class TorchScorer:
    """Per-token log-probs of a transformers causal LM, batched and chunked (see the module docstring).

    model: a loaded `PreTrainedModel` for causal LM, already on `device` in its
    scoring dtype (`scoring_dtype(device)`), e.g. from `pear_data.models.load_model`.
    It is put in eval mode. device: "cpu", "cuda", "cuda:N" or "auto".
    batch_tokens: padded tokens per forward (batch_size * max_len); None: the
    device's default (`default_batch_tokens`: 8192 on CPU, 32768 on CUDA).
    vocab_chunk_tokens: positions per lm_head + log-softmax chunk; None: the
    device's default (`default_vocab_chunk_tokens`: 256 on CPU, 1024 on CUDA).
    The scorer's extra memory is about 2 x vocab_chunk_tokens x vocab x 4 bytes
    (bench/score_throughput.py measures the peak and the speed of other sizes).
    max_padding: a batch stops taking shorter rows when its pad tokens would
    exceed this fraction of its real tokens (`plan_batches`); math.inf fills
    every batch up to `batch_tokens`.
    progress: called after every batch with (rows_done, tokens_done), cumulative
    within the current `score` call; tokens are real (unpadded) tokens. On
    CUDA a batch counts when its work is queued on the device.
    logprob_strategy: how `policy_logprobs` sums each temperature ("auto",
    "exp", "power"; see `sampling.py`).
    fused_head: use liger-kernel's fused linear + cross-entropy where it
    applies (see the module docstring); needs CUDA and liger-kernel.
    name: how messages name the model (e.g. "--target DIR").
    stop: once this event is set, `score` raises ScoringStopped before its
    next batch (a run being cancelled waits for one batch, not a whole call).
    `score` raises ModelSpecError (a usage error, naming the model and its
    vocabulary size) for a token id the model's embedding does not have: its
    tokenizer and its weights do not belong together.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str = "cpu",
        batch_tokens: int | None = None,
        vocab_chunk_tokens: int | None = None,
        max_padding: float = 0.1,
        progress: ProgressCallback | None = None,
        logprob_strategy: str = "auto",
        fused_head: bool = False,
        name: str = "the model",
        stop: threading.Event | None = None,
    ) -> None:
        self.device = torch.device(resolve_device(device))
        batch_tokens = default_batch_tokens(str(self.device)) if batch_tokens is None else batch_tokens
        vocab_chunk_tokens = (default_vocab_chunk_tokens(str(self.device)) if vocab_chunk_tokens is None
                              else vocab_chunk_tokens)
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if vocab_chunk_tokens < 1:
            raise ValueError(f"vocab_chunk_tokens must be >= 1, got {vocab_chunk_tokens}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0, got {max_padding}")
        if logprob_strategy not in STRATEGIES:
            raise ValueError(f"logprob_strategy must be one of {STRATEGIES}, got {logprob_strategy!r}")
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
        self.head_vocab = int(self.lm_head.weight.shape[0])
        self.batch_tokens = batch_tokens
        self.vocab_chunk_tokens = vocab_chunk_tokens
        self.max_padding = max_padding
        self.progress = progress
        self.name = name
        self.stop = stop
        self.logprob_strategy = logprob_strategy
        # A plain bias-free Linear head can write its logits into a reused buffer (torch.mm(out=)); in
        # bf16/fp16 on CUDA with float32 output straight from the matmul (dropped if torch lacks the overload).
        self._plain_head = type(self.lm_head) is torch.nn.Linear and self.lm_head.bias is None
        self._fp32_out_mm = (self._plain_head and self.device.type == "cuda"
                             and self.lm_head.weight.dtype in (torch.bfloat16, torch.float16))
        self.fused_head = fused_head
        self._liger = None
        if fused_head:
            self._liger = _load_liger(self.device)
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
        batches: list[_BatchResult] = []
        buffers = _ChunkBuffers(self.device, self.head_vocab)
        with torch.inference_mode():
            for rows in plan_batches(lengths, self.batch_tokens, self.max_padding):
                if self.stop is not None and self.stop.is_set():
                    raise ScoringStopped(f"{self.name}: scoring stopped")
                result = self._score_batch(rows, [sequences[r] for r in rows], [completion_masks[r] for r in rows],
                                           policies, buffers)
                if result is not None:
                    batches.append(result)
                rows_done += len(rows)
                tokens_done += sum(lengths[r] for r in rows)
                if self.progress is not None:
                    self.progress(rows_done, tokens_done)
            del buffers
            host = self._to_host([torch.stack(b.values) for b in batches])
        for batch, values in zip(batches, host):
            splits = np.cumsum(np.bincount(batch.row_of, minlength=len(batch.rows)))[:-1]
            row_positions = np.split(batch.positions, splits)
            for p in range(len(policies)):
                for r, positions, row_values in zip(batch.rows, row_positions, np.split(values[p], splits)):
                    outputs[p][r][positions] = row_values
        return outputs

    def describe(self) -> dict:
        """The settings that decide the numbers, for a manifest (JSON-ready)."""
        strategy = self.logprob_strategy
        if strategy == "auto":
            strategy = "power" if self.device.type == "cuda" else "exp"
        return {
            "backend": "torch",
            "device": str(self.device),
            "dtype": str(self.lm_head.weight.dtype).removeprefix("torch."),
            "batch_tokens": self.batch_tokens,
            "vocab_chunk_tokens": self.vocab_chunk_tokens,
            "logprob_strategy": strategy,
            "head_logits": "float32 matmul output" if self._fp32_out_mm else "head output cast to float32",
            "fused_head": self._liger is not None,
        }

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
                raise ModelSpecError(
                    f"{self.name}: token id {int(seq.max() if seq.max() >= self.vocab_size else seq.min())} is "
                    f"outside the model's vocabulary of {self.vocab_size} tokens (ids 0 to {self.vocab_size - 1}): "
                    "its tokenizer makes tokens its weights do not have (config.json vocab_size, the embedding); "
                    "give the model the tokenizer it was trained with"
                )

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device; on CUDA through pinned memory, without blocking the host."""
        tensor = torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _to_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Device tensors as numpy arrays, with one device-to-host copy (and one wait) for all of them."""
        if not tensors:
            return []
        sizes = [t.shape[-1] for t in tensors]
        flat = torch.cat(tensors, dim=-1)
        if self.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            host = flat
        return np.split(host.numpy(), np.cumsum(sizes)[:-1], axis=-1)

    def _score_batch(
        self, rows: np.ndarray, sequences: list[np.ndarray], masks: list[np.ndarray],
        policies: list[SamplingParams], buffers: _ChunkBuffers,
    ) -> _BatchResult | None:
        """Score one padded batch (input rows `rows`); its values stay on the device. None: nothing to score."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        max_len = int(lengths.max()) if len(lengths) else 0
        ids = np.zeros((len(sequences), max_len), dtype=np.int64)  # pad id 0: any valid id, never attended to
        scored = np.zeros((len(sequences), max_len), dtype=bool)  # position i's token gets a log-prob
        for b, (seq, mask) in enumerate(zip(sequences, masks)):
            ids[b, : len(seq)] = seq
            scored[b, 1 : len(seq)] = np.asarray(mask[1:]) != 0
        # (b, i) with scored[b, i], in row-major order: hidden state at i - 1 predicts token i.
        row_of, positions = np.nonzero(scored)
        if len(positions) == 0:
            return None

        input_ids = self._upload(ids)
        flat_predictor = self._upload(row_of * max_len + positions - 1)
        position_ids = torch.arange(max_len, device=self.device).expand(len(sequences), max_len)
        # No attention_mask: with right padding, causal attention already keeps every real token from
        # seeing the pads (they come after it), and the unmasked causal kernel is the fast one.
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_predictor)  # [T, H]
        targets = input_ids.reshape(-1).index_select(0, flat_predictor + 1)  # [T]
        del input_ids

        values = self._fused_logprobs(hidden, targets, policies)
        if values is None:
            values = [torch.empty(len(positions), dtype=torch.float32, device=self.device) for _ in policies]
            for start in range(0, len(positions), self.vocab_chunk_tokens):
                stop = min(start + self.vocab_chunk_tokens, len(positions))
                logits_buffer, scratch = buffers.get(stop - start)
                logits = self._logits(hidden[start:stop], out=logits_buffer)
                chunk = policy_logprobs(logits, targets[start:stop], policies, overwrite=True, scratch=scratch,
                                        strategy=self.logprob_strategy)
                for p, logp in enumerate(chunk):
                    values[p][start:stop] = logp
        return _BatchResult(rows=rows, row_of=row_of, positions=positions, values=values)

    def _logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [C, V] logits of hidden states [C, H], as the model's causal-LM head computes them.

        out: an optional float32 [C, V] buffer to write them into (a plain
        bias-free Linear head writes there directly). Softcapping is applied
        after the cast to float32 (transformers applies it in the model dtype;
        identical in float32, more precise in bf16).
        """
        weight = self.lm_head.weight
        if out is None:
            logits = self.lm_head(hidden).float()
        elif self._fp32_out_mm:
            try:
                logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError, NotImplementedError):  # no float32-output overload in this build
                self._fp32_out_mm = False
                logits = self._logits(hidden, out)
        elif self._plain_head and weight.dtype == torch.float32 and hidden.dtype == torch.float32:
            logits = torch.mm(hidden, weight.t(), out=out)
        else:
            logits = out.copy_(self.lm_head(hidden))
        if self.final_logit_softcapping is not None:
            cap = float(self.final_logit_softcapping)
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _fused_logprobs(
        self, hidden: torch.Tensor, targets: torch.Tensor, policies: list[SamplingParams]
    ) -> list[torch.Tensor] | None:
        """Per policy float32 [T] from liger-kernel's fused linear + cross-entropy, or None where it does not apply.

        Applies with `fused_head` when every policy has top_p == 1 and the head
        has no softcapping. Temperature: logits / tau = (h / tau) W^T + b / tau.
        Not run in this project's tests (CUDA only).
        """
        if self._liger is None or self.final_logit_softcapping is not None or any(p.top_p < 1.0 for p in policies):
            return None
        weight = self.lm_head.weight.detach()
        bias = None if self.lm_head.bias is None else self.lm_head.bias.detach()
        by_temperature: dict[float, torch.Tensor] = {}
        for tau in dict.fromkeys(p.temperature for p in policies):
            loss = self._liger(
                input=hidden if tau == 1.0 else hidden / tau, weight=weight, target=targets,
                bias=None if bias is None or tau == 1.0 else bias / tau, reduction="none",
            )
            loss = getattr(loss, "loss", loss)  # releases that return an output object or a tuple
            if isinstance(loss, tuple):
                loss = loss[0]
            by_temperature[tau] = -loss.float()
        return [by_temperature[p.temperature] for p in policies]

    def _check_logits_path(self) -> None:
        """Raise if decoder -> lm_head (-> softcap) does not reproduce model(input_ids).logits.

        Checks the buffered path the chunks use; with `fused_head`, also that
        the fused head's log-probs agree with the chunked path's.
        """
        ids = (torch.arange(8, device=self.device) * 7 + 3) % self.vocab_size
        with torch.inference_mode():
            reference = self.model(input_ids=ids[None], use_cache=False).logits[0].float()
            hidden = self.decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
            ours = self._logits(hidden, out=torch.empty(8, self.head_vocab, dtype=torch.float32, device=self.device))
            scale = max(1.0, float(reference.abs().max()))
            low_precision = self.lm_head.weight.dtype != torch.float32
            tolerance = 2e-2 if low_precision else 1e-4
            diff = float((ours - reference).abs().max())
            if not diff <= tolerance * scale:
                raise ValueError(
                    f"{type(self.model).__name__}: hidden states -> lm_head"
                    f"{' -> softcapping' if self.final_logit_softcapping else ''} differs from the model's own logits "
                    f"by {diff:.3g} (logits up to {scale:.3g}); this model family post-processes its logits in a way "
                    "the torch scorer does not mirror, so its log-probs would be wrong. Please report the model."
                )
            if self._liger is not None and self.final_logit_softcapping is None:
                targets = ids[1:]
                chunked = policy_logprobs(ours[:-1].clone(), targets, [SamplingParams()])[0]
                fused = self._fused_logprobs(hidden[:-1].contiguous(), targets, [SamplingParams()])[0]
                gap = float((fused - chunked).abs().max())
                if not gap <= (0.1 if low_precision else 1e-3):
                    raise ValueError(f"fused_head: liger-kernel's log-probs differ from the chunked path's by "
                                     f"{gap:.3g}")


def _load_liger(device: torch.device) -> Callable:
    """liger-kernel's functional fused linear + cross-entropy, or a ValueError saying why it cannot be used."""
    if device.type != "cuda":
        raise ValueError(f"fused_head needs a CUDA device (liger-kernel is Triton on GPU), got {device}")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise ValueError(f"fused_head needs liger-kernel: pip install liger-kernel ({exc})") from None
    return liger_fused_linear_cross_entropy
