"""Drafters for speculative decoding inside the continuous-batching scheduler.

Each step, a decoding sequence may carry up to `draft_max_tokens` guessed tokens
after its last token. The target model scores them in the same batch, and the
scheduler samples position by position with the request's own sampler chain,
keeping each guess only while the sampled token equals it. The output is the
one plain decoding would give (exactly so for greedy; for random sampling each
token is still drawn from the target's distribution), only sooner when guesses
land. Rejected positions are removed from the KV cache.

Two drafters:
- `NgramDrafter` (prompt lookup): the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens (each sequence keeps an
  `NgramIndex`). Free, and strong on outputs that copy from the input
  (quoting, editing, code, summaries with names).
- `ModelDrafter`: a small model with the same vocabulary, run greedily on its
  own context, one KV sequence per scheduler slot.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp as lc
from loguru import logger

from backends.base import LoadOptions
from backends.llamacpp.native import NativeBatch, NativeModel


class NgramIndex:
    """Where each n-gram of one sequence last occurred, extended as the sequence grows (prompt lookup)."""

    __slots__ = ("table", "upto")

    NGRAM_MIN = 2
    NGRAM_MAX = 4

    def __init__(self) -> None:
        self.table: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.upto = 0  # n-grams ending before this index are in the table

    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the context's last n-gram."""
        n_ctx = len(context)
        if self.upto > n_ctx - 1:  # the sequence was rewound: start over
            self.table.clear()
            self.upto = 0
        table, lo, hi = self.table, self.NGRAM_MIN, self.NGRAM_MAX
        # Index every n-gram that has a continuation (ends before the last token).
        for end in range(self.upto, n_ctx - 1):
            for n in range(lo, hi + 1):
                start = end - n + 1
                if start < 0:
                    break
                table[tuple(context[start : end + 1])] = end + 1
        self.upto = max(self.upto, n_ctx - 1)
        for n in range(hi, lo - 1, -1):
            if n_ctx >= n:
                follow = table.get(tuple(context[n_ctx - n :]))
                if follow is not None:
                    return context[follow : follow + k]
        return []


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share long prefixes, Python loops are slow.
    step = 64
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftError(Exception):
    pass


class NgramDrafter:
    kind = "ngram"
    caught_up = 0  # it keeps no state of its own to bring up to date

    def propose(self, wants: list[tuple[int, list[int], int, NgramIndex]]) -> dict[int, list[int]]:
        """wants: (slot, context, max tokens, that sequence's index) -> guesses per slot."""
        return {seq: index.propose(context, k) for seq, context, k, index in wants}

    def forget(self, seq: int) -> None:
        pass

    def free(self) -> None:
        pass


class ModelDrafter:
    """A draft model with one KV sequence per target slot; it drafts greedily."""

    kind = "model"

    def __init__(self, path: Path, target: NativeModel, options: LoadOptions) -> None:
        draft_options = LoadOptions(
            max_seq_len=target.n_ctx,
            cache_size=target.n_ctx,
            max_batch_size=target.n_slots,
            chunk_size=options.chunk_size,
            n_threads=options.n_threads,
            n_gpu_layers=options.n_gpu_layers,
            cache_mode=options.cache_mode,
            flash_attention=options.flash_attention,
        )
        self.native = NativeModel(path, draft_options)
        try:
            check_same_vocab(target, self.native)
        except DraftError:
            self.native.free()
            raise
        self.tokens: list[list[int]] = [[] for _ in range(target.n_slots)]
        self.batch = NativeBatch(self.native.n_batch)
        self.caught_up = 0  # the most tokens one sequence had to be fed before guessing, last propose

    def forget(self, seq: int) -> None:
        lc.llama_memory_seq_rm(self.native.mem, seq, -1, -1)
        self.tokens[seq] = []

    def propose(self, wants: list[tuple[int, list[int], int, NgramIndex]]) -> dict[int, list[int]]:
        native, batch = self.native, self.batch
        batch.clear()
        budget = batch.capacity
        rows: list[tuple[int, int, int]] = []  # (seq, batch index of its logits, tokens wanted)
        self.caught_up = 0
        for seq, context, k, _ in wants:
            have = self.tokens[seq]
            keep = min(common_prefix(have, context), len(context) - 1)
            if keep < len(have):
                if not lc.llama_memory_seq_rm(native.mem, seq, keep, -1):
                    lc.llama_memory_seq_rm(native.mem, seq, -1, -1)
                    keep = 0
                del have[keep:]
            feed = context[keep:]
            self.caught_up = max(self.caught_up, len(feed))
            if budget <= 0:
                continue
            if len(feed) > budget:  # a long prompt catches up over several steps; no guesses yet
                batch.add(feed[:budget], keep, seq, False)
                have.extend(feed[:budget])
                budget = 0
                continue
            rows.append((seq, batch.add(feed, keep, seq, True), k))
            have.extend(feed)
            budget -= len(feed)
        drafts: dict[int, list[int]] = {seq: [] for seq, _, _ in rows}
        while batch.n:
            if lc.llama_decode(native.ctx, batch.finalize()) != 0:
                self._reset()
                return {}
            next_rows = []
            batch.clear()
            for seq, idx, k in rows:
                token = int(native.logits_row(idx).argmax())
                drafts[seq].append(token)
                if len(drafts[seq]) < k:
                    have = self.tokens[seq]
                    next_rows.append((seq, batch.add([token], len(have), seq, True), k))
                    have.append(token)
            rows = next_rows
        return drafts

    def _reset(self) -> None:
        logger.debug("draft model cache full; dropping its cache")
        lc.llama_memory_clear(self.native.mem, True)
        self.tokens = [[] for _ in self.tokens]

    def free(self) -> None:
        self.native.free()


def check_same_vocab(target: NativeModel, draft: NativeModel) -> None:
    """Speculation needs token ids to mean the same text in both models."""
    if target.n_vocab != draft.n_vocab:
        raise DraftError(
            f"The draft model '{draft.path.name}' has {draft.n_vocab} tokens and the model has {target.n_vocab}; "
            "pick a draft model from the same family (same tokenizer)."
        )
    for special in (lc.llama_vocab_bos, lc.llama_vocab_eos):
        if special(target.vocab) != special(draft.vocab):
            raise DraftError(
                f"The draft model '{draft.path.name}' uses different special tokens; pick one with the same tokenizer."
            )
    step = max(1, target.n_vocab // 512)
    for token in range(0, target.n_vocab, step):
        if target.piece(token, special=True) != draft.piece(token, special=True):
            raise DraftError(
                f"Token {token} differs between the model and the draft model '{draft.path.name}'; "
                "pick a draft model with the same tokenizer."
            )

Drafter = NgramDrafter | ModelDrafter


def make_drafter(options: LoadOptions, target: NativeModel) -> Drafter | None:
    """The drafter a load asks for (blocking: a draft model loads here)."""
    if options.draft_mode == "ngram":
        return NgramDrafter()
    if options.draft_mode == "model":
        if not options.draft_model_path:
            raise DraftError("draft_mode is 'model' but no draft model was named; set draft_model_name.")
        return ModelDrafter(Path(options.draft_model_path), target, options)
    return None
