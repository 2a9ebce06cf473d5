"""Fill-in-the-middle prompts: tabby.json, GGUF FIM token ids, and the 400 without either.

SmolLM2 has no FIM tokens, so a copy of it is written with FIM token ids set in
its metadata (three existing control tokens stand in for <pre>/<suf>/<mid>).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backends.base import LoadOptions
from common.errors import BadRequestError
from common.generation.fim import (
    FIM_KEYS,
    FimConfigError,
    fim_prompt,
    fim_tokens,
    has_fim,
    render_template,
)
from common.models.manager import LoadedModel, ModelManager
from common.models.options import ManagerSettings
from tests.conftest import MODEL_FILE, MODEL_NAME, ROOT

FIM_IDS = (11, 12, 13)  # <jupyter_start>, <jupyter_text>, <jupyter_code> in SmolLM2's vocabulary
FIM_NAME = "SmolLM2-FIM"
FIM_FILE = f"{FIM_NAME}.gguf"
PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


def build_fim_copy(src: Path, dst: Path, ids: tuple[int, int, int] = FIM_IDS) -> Path:
    """Copy a GGUF with every key and tensor, plus the FIM token ids (once per test session)."""
    if dst.exists():
        return dst
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    part = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(part, arch=arch.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    new = {key: MetadataDetails(gguf.GGUFValueType.UINT32, i) for key, i in zip(FIM_KEYS[0], ids)}
    copy_with_new_metadata(reader, writer, new, [])
    part.replace(dst)
    return dst


def fim_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FIM copy of the real model, shared by every module of the session."""
    src = ROOT / "models" / MODEL_FILE
    if not src.exists():
        pytest.skip(f"{src} is missing; run scripts/fetch_default_model.py")
    folder = tmp_path_factory.getbasetemp() / "fim-model"
    folder.mkdir(exist_ok=True)
    return build_fim_copy(src, folder / FIM_FILE)


@pytest.fixture(scope="session")
def fim_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fim_copy(tmp_path_factory)


@pytest.fixture(scope="module")
def manager(fim_gguf: Path, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelManager]:
    """The FIM copy as a folder model (where tabby.json may live) beside the plain model file."""
    model_dir = tmp_path_factory.mktemp("fim-models")
    (model_dir / FIM_NAME).mkdir()
    (model_dir / FIM_NAME / FIM_FILE).symlink_to(fim_gguf)
    (model_dir / MODEL_FILE).symlink_to(model_path)
    options = LoadOptions(max_seq_len=256, max_batch_size=1, n_threads=1)
    models = ModelManager(ManagerSettings(model_dir, ROOT / "templates", options, max_loaded=2))

    async def load() -> None:
        await models.load(FIM_NAME)
        await models.load(MODEL_NAME)

    asyncio.run(load())
    yield models
    asyncio.run(models.close())


@pytest.fixture
def fim_model(manager: ModelManager) -> Iterator[LoadedModel]:
    model = manager.get(FIM_NAME)
    yield model
    (manager.model_dir / FIM_NAME / "tabby.json").unlink(missing_ok=True)


@pytest.fixture
def plain_model(manager: ModelManager) -> Iterator[LoadedModel]:
    yield manager.get(MODEL_NAME)
    (manager.model_dir / "tabby.json").unlink(missing_ok=True)


def stub_model(base: LoadedModel, **info: Any) -> LoadedModel:
    """The same tokenizer under different ModelInfo (metadata, add_bos_token)."""
    engine = SimpleNamespace(
        info=replace(base.info, **info), tokenize=base.engine.tokenize, detokenize=base.engine.detokenize
    )
    return LoadedModel(base.name, engine, None)  # type: ignore[arg-type]


def tok(model: LoadedModel, text: str) -> list[int]:
    return model.engine.tokenize(text, add_bos=False, special=False)


# -- GGUF metadata -------------------------------------------------------------
def test_copy_carries_fim_ids(fim_model: LoadedModel, plain_model: LoadedModel) -> None:
    meta = fim_model.info.metadata
    assert [meta[k] for k in FIM_KEYS[0]] == [str(i) for i in FIM_IDS]
    assert meta["tokenizer.chat_template"] == plain_model.info.metadata["tokenizer.chat_template"]
    assert fim_model.info.n_vocab == plain_model.info.n_vocab
    assert has_fim(fim_model) and not has_fim(plain_model)


def test_psm_layout(fim_model: LoadedModel) -> None:
    pre, suf, mid = FIM_IDS
    prompt = fim_prompt(fim_model, PREFIX, SUFFIX)
    assert not fim_model.info.add_bos_token  # SmolLM2 adds no BOS
    assert prompt.tokens == [pre, *tok(fim_model, PREFIX), suf, *tok(fim_model, SUFFIX), mid]
    assert prompt.text is not None and PREFIX in prompt.text and SUFFIX in prompt.text


def test_bos_and_middle(fim_model: LoadedModel) -> None:
    pre, suf, mid = FIM_IDS
    bos = fim_model.info.bos_token_id
    forced = fim_prompt(fim_model, "a", "b", add_bos=True)
    assert forced.tokens == [bos, pre, *tok(fim_model, "a"), suf, *tok(fim_model, "b"), mid]
    follows_model = fim_prompt(stub_model(fim_model, add_bos_token=True), "a", "b")
    assert follows_model.tokens == forced.tokens
    middle = fim_prompt(fim_model, "a", "b", middle="    x")
    assert middle.tokens == [pre, *tok(fim_model, "a"), suf, *tok(fim_model, "b"), mid, *tok(fim_model, "    x")]


def test_empty_prefix_and_suffix(fim_model: LoadedModel) -> None:
    assert fim_prompt(fim_model, "", "").tokens == list(FIM_IDS)


def test_code_text_is_not_parsed_as_special_tokens(fim_model: LoadedModel) -> None:
    im_start = fim_model.engine.tokenize("<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1
    prompt = fim_prompt(fim_model, "s = '<|im_start|>'", "")
    assert im_start[0] not in prompt.tokens


def test_older_key_names_and_incomplete_metadata(plain_model: LoadedModel) -> None:
    old = dict(zip(FIM_KEYS[1], ("20", "21", "22")))
    model = stub_model(plain_model, metadata=old)
    assert fim_prompt(model, "x", "y").tokens == [20, *tok(model, "x"), 21, *tok(model, "y"), 22]
    partial = stub_model(plain_model, metadata=dict(list(old.items())[:2]))
    assert fim_tokens(partial) is None and not has_fim(partial)
    outside = stub_model(plain_model, metadata={**old, FIM_KEYS[1][2]: str(plain_model.info.n_vocab)})
    assert fim_tokens(outside) is None


# -- tabby.json ----------------------------------------------------------------
def write_tabby(folder: Path, data: Any) -> None:
    (folder / "tabby.json").write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def test_tabby_json_wins_over_metadata(fim_model: LoadedModel, manager: ModelManager) -> None:
    folder = manager.model_dir / FIM_NAME
    write_tabby(folder, {"prompt_template": "<|im_start|>{prefix}<|im_end|>{suffix}<|endoftext|>"})
    prompt = fim_prompt(fim_model, PREFIX, SUFFIX)
    text = f"<|im_start|>{PREFIX}<|im_end|>{SUFFIX}<|endoftext|>"
    assert prompt.text == text
    assert prompt.tokens == fim_model.engine.tokenize(text, add_bos=False, special=True)
    assert prompt.tokens[0] == 1 and not set(FIM_IDS) & set(prompt.tokens)  # markers became special tokens
    assert fim_prompt(fim_model, "a", "b", middle="c").text == "<|im_start|>a<|im_end|>b<|endoftext|>c"


def test_tabby_json_without_template_falls_back(fim_model: LoadedModel, manager: ModelManager) -> None:
    write_tabby(manager.model_dir / FIM_NAME, {"chat_template": "{{ messages }}"})
    assert fim_prompt(fim_model, "a", "b").tokens[0] == FIM_IDS[0]


def test_broken_tabby_json_says_how_to_fix(fim_model: LoadedModel, manager: ModelManager) -> None:
    folder = manager.model_dir / FIM_NAME
    write_tabby(folder, "{not json")
    with pytest.raises(FimConfigError) as exc:
        fim_prompt(fim_model, "a", "b")
    assert exc.value.status == 500 and "prompt_template" in exc.value.message
    write_tabby(folder, {"prompt_template": "<PRE><SUF>{suffix}<MID>"})
    with pytest.raises(FimConfigError, match=r"\{prefix\}"):
        fim_prompt(fim_model, "a", "b")


def test_tabby_json_gives_fim_to_a_model_without_tokens(plain_model: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / plain_model.name
    folder.mkdir()
    (folder / MODEL_FILE).symlink_to(plain_model.info.path)
    write_tabby(folder, {"prompt_template": "<PRE>{prefix}<SUF>{suffix}<MID>"})
    model = stub_model(plain_model, path=str(folder / MODEL_FILE))
    assert has_fim(model)
    assert fim_prompt(model, "x", "y").text == "<PRE>x<SUF>y<MID>"


def test_template_placeholders_expand_once() -> None:
    assert render_template("<P>{prefix}<S>{suffix}<M>", "f'{suffix}'", "{prefix}") == "<P>f'{suffix}'<S>{prefix}<M>"


# -- no FIM at all ---------------------------------------------------------------
def test_model_without_fim_is_a_400(plain_model: LoadedModel) -> None:
    with pytest.raises(BadRequestError) as exc:
        fim_prompt(plain_model, PREFIX, SUFFIX)
    err = exc.value
    assert err.status == 400 and err.param == "suffix" and err.code == "fim_not_supported"
    assert "FIM" in err.message and "tabby.json" in err.message and "prompt_template" in err.message
    with pytest.raises(BadRequestError) as exc:
        fim_prompt(plain_model, PREFIX, SUFFIX, param="input_suffix")
    assert exc.value.param == "input_suffix" and "'input_suffix'" in exc.value.message


def test_tabby_json_in_the_shared_model_dir_is_ignored(plain_model: LoadedModel, manager: ModelManager) -> None:
    write_tabby(manager.model_dir, {"prompt_template": "<PRE>{prefix}<SUF>{suffix}<MID>"})
    assert not has_fim(plain_model)
    with pytest.raises(BadRequestError):
        fim_prompt(plain_model, "a", "b")
