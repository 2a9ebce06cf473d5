"""Images in requests: where each comes from, fetching and decoding it, and the checks before a model sees it.

Every dialect hands its images here as `ImageSource`s (a data: URI, an
http(s) URL, or bare base64, with the request field it came from). `resolve`
checks the count, fetches URLs (fetch.py), decodes with Pillow off the event
loop and refuses, as a 400 naming the field, what is not a whole image or is
too large. What comes out is `ImageInput`s: packed RGB and a hash of the bytes
the client sent, which keys prefix reuse in the engine.

OpenAI-style messages carry images as content parts; `resolve_message_images`
swaps each such part for a resolved `{"type": "image", "image": i}` part that
the prompt builder (prompts.py) places where the chat template puts images.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from backends.base import ImageInput
from common.config.schema import ParleyConfig
from common.errors import BadRequestError
from common.generation.fetch import FetchPolicy, FetchRefused, fetch_image_bytes, refused

IMAGE_PART_TYPES = ("image_url", "input_image", "image")
RESOLVED = "image"  # a resolved image part: {"type": "image", "image": index}
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageSource:
    value: str  # a data: URI, an http(s) URL, or base64
    field: str  # the request field, for errors


@dataclass(frozen=True)
class ImagePolicy:
    max_images: int = 8
    max_pixels: int = 33_554_432
    fetch: FetchPolicy = FetchPolicy()

    @classmethod
    def from_config(cls, config: ParleyConfig) -> ImagePolicy:
        v = config.vision
        return cls(
            max_images=config.limits.max_images_per_request,
            max_pixels=config.limits.max_image_pixels,
            fetch=FetchPolicy(
                allow_remote=v.allow_remote_images,
                allowed_hosts=tuple(v.remote_image_allowed_hosts),
                max_bytes=v.remote_image_max_bytes,
                timeout=v.remote_image_timeout,
                max_redirects=v.remote_image_max_redirects,
            ),
        )


def _b64(text: str, field: str) -> bytes:
    cleaned = "".join(text.split())
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(
            f"{field} is not valid base64 image data. Send the file's bytes base64-encoded (or a data: URI).",
            param=field,
        ) from None


def decode_image(data: bytes, field: str, max_pixels: int) -> ImageInput:
    """Check and decode image bytes with Pillow (blocking); 400 naming the field when they are not a whole image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequestError(f"{field} is empty; send an image.", param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadRequestError(
                    f"{field} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} "
                    "(limits.max_image_pixels). Send a smaller image.",
                    param=field,
                )
            img.load()
            rgb = img.convert("RGB")
    except BadRequestError:
        raise
    except UnidentifiedImageError:
        raise BadRequestError(
            f"{field} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...). Send an image file.",
            param=field,
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequestError(f"{field} is too many pixels to decode safely; send a smaller image.", param=field) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequestError(
            f"{field} could not be decoded ({exc}); the file may be truncated or corrupt. Send the whole image.",
            param=field,
        ) from None
    return ImageInput(rgb.tobytes(), rgb.width, rgb.height, hashlib.sha256(data).hexdigest(), field)


async def _load(source: ImageSource, policy: ImagePolicy) -> ImageInput:
    value = source.value.strip()
    field = source.field
    if value.lower().startswith(("http://", "https://")) or re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I):
        try:
            data, _ = await fetch_image_bytes(value, policy.fetch)
        except FetchRefused as exc:
            raise refused(field, exc) from None
    elif value.lower().startswith("data:"):
        match = _DATA_URI.match(value)
        if match is None or not match.group(3):
            raise BadRequestError(
                f"{field} is a data: URI that is not base64 (expected data:image/png;base64,...).", param=field
            )
        kind = (match.group(1) or "").lower()
        if kind and not kind.startswith("image/"):
            raise BadRequestError(f"{field} is a data: URI of '{kind}', not an image.", param=field)
        data = _b64(value[match.end():], field)
    else:
        data = _b64(value, field)
    return await asyncio.to_thread(decode_image, data, field, policy.max_pixels)


async def resolve(sources: list[ImageSource], policy: ImagePolicy, *, vision: bool, model_name: str) -> list[ImageInput]:
    """Fetch and decode every image (concurrently), or raise the first client error, naming its field."""
    if not sources:
        return []
    if not vision:
        raise BadRequestError(
            f"{sources[0].field}: model '{model_name}' cannot read images (it has no vision projector). Send text "
            "only, or load a vision model with its mmproj file.",
            param=sources[0].field,
            code="model_not_multimodal",
        )
    if len(sources) > policy.max_images:
        raise BadRequestError(
            f"{sources[policy.max_images].field}: this request has {len(sources)} images; at most "
            f"{policy.max_images} are allowed (limits.max_images_per_request).",
            param=sources[policy.max_images].field,
        )
    results = await asyncio.gather(*(_load(s, policy) for s in sources), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def _part_source(part: dict[str, Any], field: str) -> ImageSource:
    """The image of an OpenAI (or Responses) content part: image_url {url, detail}, a bare URL string, or image_url."""
    kind = part.get("type")
    if kind == "image_url":
        ref = part.get("image_url")
        if isinstance(ref, dict):
            url, where = ref.get("url"), f"{field}.image_url.url"
            detail = ref.get("detail")
            if detail is not None and detail not in ("auto", "low", "high"):
                raise BadRequestError(f"{field}.image_url.detail must be auto, low or high.", param=f"{field}.image_url.detail")
        else:
            url, where = ref, f"{field}.image_url"
    elif kind == "input_image":
        url, where = part.get("image_url") or part.get("url"), f"{field}.image_url"
    else:  # "image": Anthropic-like {"source": {...}} is not an OpenAI shape; accept {"image": data or URL}
        url, where = part.get("image") or part.get("url"), f"{field}.image"
    if not isinstance(url, str) or not url:
        raise BadRequestError(f"{where} must be a URL or a data: URI string.", param=where)
    return ImageSource(url, where)


def message_image_sources(messages: list[Any]) -> list[ImageSource]:
    """Image parts of OpenAI-style messages, in order."""
    found: list[ImageSource] = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                found.append(_part_source(part, f"messages[{i}].content[{j}]"))
    return found


async def resolve_message_images(
    messages: list[Any], policy: ImagePolicy, *, vision: bool, model_name: str
) -> tuple[list[Any], list[ImageInput]]:
    """The messages with each image part replaced by {"type": "image", "image": i}, and the images."""
    sources = message_image_sources(messages)
    if not sources:
        return messages, []
    images = await resolve(sources, policy, vision=vision, model_name=model_name)
    out: list[Any] = []
    n = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                parts.append({"type": RESOLVED, "image": n})
                n += 1
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images
