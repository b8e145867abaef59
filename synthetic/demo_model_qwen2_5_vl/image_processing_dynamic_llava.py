"""Image processor of Dynamic-LLaVA: LLaVA-1.5 "pad" preprocessing.

The original LLaVA-1.5 / Dynamic-LLaVA evaluation code does, for every image:

1. ``Image.open(path).convert("RGB")`` (alpha is dropped, not composited; "L" / "P" / ... are converted by PIL);
2. ``expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))``: a new square of side
   ``max(w, h)`` filled with the mean colour (122, 116, 104 for CLIP), the image pasted centred at
   ``((side - w) // 2, (side - h) // 2)``;
3. the stock CLIP image processor: resize the shortest edge to 336 (bicubic), centre crop 336, rescale by 1/255,
   normalise with the CLIP mean / std.

`DynamicLlavaImageProcessor` subclasses the stock slow (PIL / NumPy) CLIP image processor, so step 3 is literally
the stock code, and only adds steps 1 and 2 in front of it. No torchvision is needed.

This file is also a Hub remote-code module: it must stay flat (no package-relative imports) and do nothing heavy
at import time.
"""

import os
from typing import Any

import numpy as np
from PIL import Image
from transformers.processing_utils import ImagesKwargs

try:  # transformers >= 5: the PIL backend is a separate class (`CLIPImageProcessor` needs torchvision there)
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessorBase
except ImportError:  # transformers 4.x: `CLIPImageProcessor` is the slow PIL / NumPy processor
    from transformers import CLIPImageProcessor as _CLIPImageProcessorBase


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_INPUT_HINT = (
    "Pass a PIL.Image.Image, a numpy array / torch tensor (HWC or CHW, 1, 3 or 4 channels), a path to an existing "
    "image file, or an http(s) URL."
)


class DynamicLlavaImagesKwargs(ImagesKwargs, total=False):
    """Images kwargs of `DynamicLlavaImageProcessor`: the stock ones plus `do_pad_to_square`."""

    do_pad_to_square: bool


# ---------------------------------------------------------------------------------------------------------------
# Loading and conversion helpers (also used by the processor)
# ---------------------------------------------------------------------------------------------------------------


def is_url(value: str) -> bool:
    return value.startswith("http://") or value.startswith("https://")


def load_image_file(path: "str | os.PathLike") -> Image.Image:
    """Open an image file with PIL, fully decoded, with a clear `ValueError` when it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Image file not found: {path!r}. Fix the path. " + _INPUT_HINT)
    try:
        with Image.open(path) as image:
            image.load()
            # `copy()` detaches the pixels from the (now closed) file
            return image.copy()
    except Exception as error:  # UnidentifiedImageError, truncated files, decompression bombs, ...
        raise ValueError(
            f"Could not read the image file {path!r} ({type(error).__name__}: {error}). The file is corrupt or not "
            "an image format PIL can open; re-save it as PNG/JPEG or pass the image as a PIL.Image.Image."
        ) from error


def load_image_input(image: Any, timeout: float | None = None) -> Any:
    """Turn a str / PathLike image reference into a PIL image; other inputs are returned unchanged.

    Local paths are opened with PIL here (no EXIF transpose, as the original `Image.open(path).convert("RGB")`).
    http(s) and ``data:image/...`` URLs go to transformers' `load_image`.
    """
    if isinstance(image, os.PathLike):
        return load_image_file(image)
    if not isinstance(image, str):
        return image
    if is_url(image) or image.startswith("data:image/"):
        from transformers.image_utils import load_image

        try:
            return load_image(image, timeout=timeout)
        except Exception as error:
            raise ValueError(
                f"Could not load the image from {image[:200]!r} ({type(error).__name__}: {error})."
            ) from error
    return load_image_file(image)


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _is_single_image(value: Any) -> bool:
    if isinstance(value, (Image.Image, str, os.PathLike)):
        return True
    if isinstance(value, np.ndarray) or _is_torch_tensor(value):
        return value.ndim <= 3
    return False


def flatten_images(images: Any) -> list:
    """Flatten a single image, a list of images or a nested list (batch of lists) into a flat list.

    A 4-d array / tensor is taken as a batch of images.
    """
    if images is None:
        return []
    if _is_single_image(images):
        return [images]
    if isinstance(images, np.ndarray) or _is_torch_tensor(images):
        if images.ndim == 4:
            return [images[i] for i in range(images.shape[0])]
        raise ValueError(
            f"Expected an image array with 2, 3 or 4 dimensions, got shape {tuple(images.shape)}. " + _INPUT_HINT
        )
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    raise ValueError(f"Unsupported image input of type {type(images).__name__}. " + _INPUT_HINT)


def to_rgb_pil(image: Any, input_data_format: str | None = None) -> Image.Image:
    """Convert one image to an RGB PIL image the way the original code does (`.convert("RGB")`).

    PIL images: `convert("RGB")` (alpha dropped, palette / greyscale expanded). Arrays: HWC or CHW with 1, 3 or 4
    channels (a 4th channel is alpha and is dropped), or 2-d greyscale; uint8 values are used as they are, floats in
    [0, 1] are scaled by 255, other values are rounded and clipped to [0, 255]. On ambiguous shapes numpy arrays are
    read as HWC and torch tensors as CHW unless `input_data_format` ("channels_first" / "channels_last") says.
    """
    image = load_image_input(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")

    from_torch = _is_torch_tensor(image)
    if from_torch:
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Unsupported image of type {type(image).__name__}. " + _INPUT_HINT)
    array = image
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        fmt = str(getattr(input_data_format, "value", input_data_format) or "")
        channels = (1, 3, 4)
        if fmt == "channels_first":
            channels_first = True
        elif fmt == "channels_last":
            channels_first = False
        elif array.shape[0] in channels and array.shape[-1] not in channels:
            channels_first = True
        elif array.shape[-1] in channels and array.shape[0] not in channels:
            channels_first = False
        elif array.shape[-1] in channels:  # ambiguous (both ends look like channels)
            channels_first = from_torch
        else:
            raise ValueError(
                f"Cannot find the channel axis of an image array of shape {tuple(array.shape)}: expected 1, 3 or 4 "
                "channels first (CHW) or last (HWC)."
            )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(f"Expected a 2-d or 3-d image array, got shape {tuple(array.shape)}. " + _INPUT_HINT)

    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected 1, 3 or 4 channels, got an image array of shape {tuple(image.shape)}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Got an empty image array of shape {tuple(image.shape)}.")

    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)

    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)  # "L" -> "RGB" replicates the channel
    elif array.shape[-1] == 4:
        array = array[..., :3]  # alpha dropped, as `convert("RGB")` does
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def mean_background_color(image_mean: Any) -> tuple:
    """The pad colour of the original code: `tuple(int(x * 255) for x in image_processor.image_mean)`."""
    if isinstance(image_mean, (int, float)):
        image_mean = [image_mean] * 3
    return tuple(int(x * 255) for x in image_mean)


def expand_to_square(image: Image.Image, background_color: tuple) -> Image.Image:
    """The original LLaVA `expand2square`: pad to a centred square of side max(w, h) with `background_color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------


class DynamicLlavaImageProcessor(_CLIPImageProcessorBase):
    r"""
    LLaVA-1.5 "pad" image processor: RGB conversion, padding to a centred square with the mean colour, then the stock
    CLIP steps (resize shortest edge, centre crop, rescale, normalise).

    Args:
        do_pad_to_square (`bool`, *optional*, defaults to `True`):
            Pad each image to a centred square filled with `tuple(int(x * 255) for x in image_mean)` before the CLIP
            steps (LLaVA-1.5 `image_aspect_ratio="pad"`). With `False` only the RGB conversion is added.
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 336}`):
            Resize target of the CLIP step.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 336, "width": 336}`):
            Centre-crop size of the CLIP step.
        kwargs:
            Every other argument of the stock CLIP image processor (`resample` (bicubic), `image_mean`, `image_std`
            (CLIP values), `do_resize`, `do_center_crop`, `do_rescale`, `rescale_factor`, `do_normalize`, ...).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = DynamicLlavaImagesKwargs

    # class-level defaults (read by the transformers 5 backend; 4.x uses the `__init__` arguments below)
    do_pad_to_square = True
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    def __init__(self, do_pad_to_square: bool = True, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 336})
        kwargs.setdefault("crop_size", {"height": 336, "width": 336})
        kwargs.setdefault("image_mean", list(OPENAI_CLIP_MEAN))
        kwargs.setdefault("image_std", list(OPENAI_CLIP_STD))
        kwargs.setdefault("resample", 3)  # PIL bicubic
        for key in ("size", "crop_size", "image_mean", "image_std", "resample"):
            if kwargs[key] is None:
                kwargs.pop(key)
        super().__init__(**kwargs)
        self.do_pad_to_square = bool(do_pad_to_square)

    def prepare_images(
        self,
        images: Any,
        do_pad_to_square: bool | None = None,
        image_mean: Any = None,
        input_data_format: str | None = None,
    ) -> list:
        """Steps 1 and 2 of the recipe: load, convert to RGB and (optionally) pad each image to a square.

        Returns a flat list of RGB PIL images ready for the stock CLIP steps.
        """
        do_pad_to_square = self.do_pad_to_square if do_pad_to_square is None else do_pad_to_square
        image_mean = self.image_mean if image_mean is None else image_mean
        flat = flatten_images(images)
        if not flat:
            raise ValueError("No image was given. " + _INPUT_HINT)
        rgb = [to_rgb_pil(image, input_data_format=input_data_format) for image in flat]
        if do_pad_to_square:
            background = mean_background_color(image_mean)
            rgb = [expand_to_square(image, background) for image in rgb]
        return rgb

    def preprocess(self, images: Any, *args, do_pad_to_square: bool | None = None, **kwargs):
        """Preprocess an image or a batch of images (PIL, numpy HWC/CHW, torch, file path, or (nested) lists).

        Returns a `BatchFeature` with `pixel_values` ([N, 3, H, W] float32 with `return_tensors="pt"`).
        """
        input_data_format = kwargs.pop("input_data_format", None)
        prepared = self.prepare_images(
            images,
            do_pad_to_square=do_pad_to_square,
            image_mean=kwargs.get("image_mean"),
            input_data_format=input_data_format,
        )
        kwargs.pop("do_convert_rgb", None)  # already RGB; the stock conversion would composite alpha onto white
        # PIL images are HWC once turned into arrays; saying so avoids the stock guess, which reads tiny images
        # such as 1x1 (array shape (1, 1, 3)) as channels-first
        output = super().preprocess(prepared, *args, do_convert_rgb=False, input_data_format="channels_last", **kwargs)
        pixel_values = output.get("pixel_values")
        if isinstance(pixel_values, np.ndarray) and pixel_values.dtype != np.float32:
            output["pixel_values"] = pixel_values.astype(np.float32)
        elif (
            _is_torch_tensor(pixel_values)
            and pixel_values.is_floating_point()
            and str(pixel_values.dtype) != "torch.float32"
        ):
            output["pixel_values"] = pixel_values.float()
        return output


__all__ = ["DynamicLlavaImageProcessor"]
