"""What the exllamav2 and exllamav3 engines share: the event-loop side over a `JobLoop`, and model facts from the folder.

An EXL2/EXL3 model is a Hugging Face folder (config.json, tokenizer.json,
tokenizer_config.json, quantized safetensors). Tokens, their bytes and the
chat template come from those files through `HFVocab`, the same way the
transformers engine reads them; generation goes through the library's own
generator (jobloop.py). LoRA: both libraries apply PEFT adapters to the whole
model rather than per job, so a request may only use the active set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from backends.base import Engine, EngineStats, GenerationHandle, GenerationRequest, LoadOptions, LoraState, ModelInfo
from backends.hf_vocab import HFVocab
from backends.jobloop import Cancel, Command, JobLoop, LoopClosed, LoopFull, Submit
from backends.queued_handle import QueuedHandle
from common.errors import BadRequestError, ModelNotLoadedError, ServiceUnavailableError

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_vocab(folder: Path) -> HFVocab:
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise BadRequestError(
            f"'{folder.name}' has no tokenizer.json; copy it from the original model's folder.", param="model_name"
        )
    config = read_json(folder / "config.json")
    return HFVocab(Tokenizer.from_file(str(file)), int(config.get("vocab_size") or 0) or None)


def folder_model_info(folder: Path, name: str, backend: str, vocab: HFVocab, n_ctx: int,
                      options: LoadOptions, quantization: str) -> ModelInfo:
    config = read_json(folder / "config.json")
    tok_config = read_json(folder / "tokenizer_config.json")
    gen_config = read_json(folder / "generation_config.json")

    def token_of(key: str) -> int:
        value = tok_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        tid = vocab.token_id(value) if isinstance(value, str) else None
        return tid if tid is not None else int(config.get(f"{key}_id", -1) if config.get(f"{key}_id") is not None else -1)

    bos, eos = token_of("bos_token"), token_of("eos_token")
    eos_cfg = gen_config.get("eos_token_id", config.get("eos_token_id"))
    eog = {eos} if eos >= 0 else set()
    eog.update(eos_cfg if isinstance(eos_cfg, list) else ([eos_cfg] if isinstance(eos_cfg, int) else []))
    for text in _END_OF_TURN:
        tid = vocab.token_id(text)
        if tid is not None and tid in vocab.special_ids:
            eog.add(tid)
    template = tok_config.get("chat_template")
    if not isinstance(template, str):
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return ModelInfo(
        name=name,
        path=str(folder),
        backend=backend,
        n_ctx=n_ctx,
        n_ctx_train=int(config.get("max_position_embeddings") or n_ctx),
        n_vocab=vocab.n_vocab,
        bos_token=vocab.piece(bos).decode("utf-8", "replace") if bos >= 0 else "",
        eos_token=vocab.piece(eos).decode("utf-8", "replace") if eos >= 0 else "",
        bos_token_id=bos,
        eos_token_id=eos,
        add_bos_token=bool(tok_config.get("add_bos_token", False)) and bos >= 0,
        chat_template=template,
        eog_token_ids=tuple(sorted(t for t in eog if t >= 0)),
        control_token_ids=tuple(sorted(vocab.special_ids)),
        load_options=options.as_dict(),
        size_bytes=size,
        quantization=quantization,
        architecture=str(config.get("model_type", "")),
    )


def context_length(folder: Path, options: LoadOptions) -> int:
    config = read_json(folder / "config.json")
    return int(options.max_seq_len or config.get("max_position_embeddings") or 4096)


class JobLoopEngine(Engine):
    """The event-loop side; subclasses load the library and say how a request becomes a job."""

    unsupported: frozenset[str] = frozenset()

    def _start(self, generator: Any, vocab: HFVocab, info: ModelInfo, options: LoadOptions, kv_cells: int) -> None:
        self.vocab = vocab
        self.info = info
        self._active_loras: dict[str, float] = {}
        # name -> (PEFT folder, (library adapter, its scale) once applied)
        self._loras: dict[str, tuple[Path, tuple[Any, float] | None]] = {}
        self._loop = JobLoop(
            generator,
            self._make_job,
            vocab.piece,
            slots=options.max_batch_size,
            capacity=options.max_batch_size + options.max_queue,
            kv_cells=kv_cells,
            name=f"{info.backend}-{info.name}",
        )

    def _make_job(self, handle: QueuedHandle) -> Any:  # runs on the loop's thread
        raise NotImplementedError

    def _free(self) -> None:
        """Release the library's model and cache (after the loop stopped)."""

    # -- Engine interface -------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        bos = self.info.bos_token_id if add_bos and self.info.bos_token_id >= 0 else None
        return self.vocab.tokenize(text, bos=bos, special=special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return self.vocab.detokenize(tokens, special=special)

    def token_piece(self, token: int) -> bytes:
        return self.vocab.piece(token)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if request.loras is not None and dict(request.loras) != self._active_loras:
            raise BadRequestError(
                f"The {self.info.backend} backend applies adapters to the whole model, so a request can only use "
                f"the active set ({self._active_loras or 'none'}). Change it with POST /v1/lora/load.",
                param="loras",
            )
        if not request.prompt_tokens:
            raise BadRequestError("The prompt is empty: send at least one token.", param="prompt")
        unsupported = self.unsupported & request.params.active_knobs()
        if unsupported:
            logger.warning(
                "{} has no sampler for {}; accepted but not applied (request {})",
                self.info.backend, ", ".join(sorted(unsupported)), request.request_id,
            )
        handle = QueuedHandle(request, asyncio.get_running_loop(), self._cancel)
        try:
            self._loop.post(Submit(handle))
        except LoopFull:
            raise ServiceUnavailableError(
                "The server is busy: every slot and queue place is taken. Retry shortly.",
                retry_after=1, code="server_busy",
            ) from None
        except LoopClosed:
            raise ModelNotLoadedError(f"Model '{self.info.name}' is unloading. Load a model and retry.") from None
        return handle

    def _cancel(self, handle: QueuedHandle) -> None:
        try:
            self._loop.post(Cancel(handle))
        except LoopClosed:
            pass

    def stats(self) -> EngineStats:
        return self._loop.stats()

    async def close(self) -> None:
        self._loop.close()
        await asyncio.to_thread(self._loop.join)
        self._free()

    # -- LoRA (PEFT folders; the whole model) --------------------------------------------------
    supports_lora = True

    def _lib_load_lora(self, folder: Path, scale: float) -> Any:
        raise NotImplementedError

    def _lib_unload_lora(self, adapter: Any) -> None:
        raise NotImplementedError

    def _lib_activate(self, adapters: list[Any]) -> None:
        """Make exactly these loaded adapters the model's (loop thread, no job running)."""

    async def load_lora(self, name: str, path: Path) -> None:
        self._loras[name] = (peft_folder(path, self.info.backend), None)

    async def unload_loras(self, names: list[str] | None = None) -> list[str]:
        gone = sorted(n for n in (self._loras if names is None else names) if n in self._loras)
        if gone:
            self.set_loras([(n, s) for n, s in self._active_loras.items() if n not in gone])
        for n in gone:
            self._loras.pop(n, None)
        return gone

    def loras(self) -> list[LoraState]:
        return [LoraState(n, str(p), self._active_loras.get(n, 0.0)) for n, (p, _) in self._loras.items()]

    def set_loras(self, pairs: list[tuple[str, float]]) -> None:
        missing = [n for n, _ in pairs if n not in self._loras]
        if missing:
            raise BadRequestError(f"LoRA {missing[0]!r} is not loaded; load it first with POST /v1/lora/load.",
                                  param="loras")
        wanted = dict(pairs)
        self._active_loras = wanted

        def apply() -> None:  # loop thread
            self.require_idle()
            for name, (folder, applied) in list(self._loras.items()):
                if applied is not None and (name not in wanted or applied[1] != wanted[name]):
                    self._lib_unload_lora(applied[0])
                    self._loras[name] = (folder, None)
            for name, scale in wanted.items():
                folder, applied = self._loras[name]
                if applied is None:
                    self._loras[name] = (folder, (self._lib_load_lora(folder, scale), scale))
            self._lib_activate([self._loras[n][1][0] for n in wanted])  # type: ignore[index]

        def failed() -> None:
            logger.warning("adapters not changed: the model was unloading")

        def run() -> None:
            try:
                apply()
            except Exception as exc:  # noqa: BLE001 - reported in the log; requests keep the previous set
                logger.error("could not apply LoRA adapters {}: {}", list(wanted), exc)

        try:
            self._loop.post(Command(run, failed))
        except LoopClosed:
            raise ModelNotLoadedError(f"Model '{self.info.name}' is unloading.") from None

    async def on_loop(self, command: Callable[[], object]) -> object:
        """Run `command` on the generator's thread, between iterations."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[object] = loop.create_future()

        def settle(result: object, exc: BaseException | None) -> None:
            def apply() -> None:
                if not done.done():
                    done.set_exception(exc) if exc is not None else done.set_result(result)
            try:
                loop.call_soon_threadsafe(apply)
            except RuntimeError:
                pass

        def run() -> None:
            try:
                settle(command(), None)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                settle(None, exc)

        def abandon() -> None:
            settle(None, ModelNotLoadedError(f"Model '{self.info.name}' was unloaded before this change ran."))

        try:
            self._loop.post(Command(run, abandon))
        except LoopClosed:
            raise ModelNotLoadedError(f"Model '{self.info.name}' is unloading.") from None
        return await done

    def require_idle(self) -> None:
        """Adapters change the whole model: only between requests (loop thread)."""
        if not self._loop.idle():
            raise BadRequestError(
                f"The {self.info.backend} backend changes adapters only while no request runs; retry when idle.",
                param="loras", code="server_busy",
            )


def peft_folder(path: Path, backend: str) -> Path:
    folder = path if path.is_dir() else path.parent
    if not (folder / "adapter_config.json").is_file():
        raise BadRequestError(
            f"The {backend} backend loads PEFT adapters (a folder with adapter_config.json and "
            f"adapter_model.safetensors); '{path.name}' is not one. GGUF adapters work with the llama.cpp backend.",
            param="loras",
        )
    return folder


def cache_mode_bits(mode: str) -> tuple[int, int] | None:
    """'FP16' -> None; 'Q4'/'Q6'/'Q8' -> (k, v) bits; 'K,V' (e.g. '4,6') -> those bits."""
    m = mode.strip().upper()
    if m in ("FP16", "F16", ""):
        return None
    if m in ("Q4", "Q6", "Q8"):
        bits = int(m[1])
        return bits, bits
    try:
        k, v = (int(x) for x in m.split(","))
    except ValueError:
        raise BadRequestError(f"cache_mode {mode!r} is not FP16, Q4, Q6, Q8 or 'K,V' bits.", param="cache_mode") from None
    return k, v
