"""Log-probs of a batch that mixes image and text-only prompts (docs/hardening.md).

TRL computes per-token log-probs in chunks of ``batch_size`` rows and hands each chunk the images of its rows; a chunk
of text-only rows then gets empty image tensors, which a vision-language model refuses (``torch.cat(): expected a
non-empty list``). :func:`logps_by_chunk` makes the same chunks itself, moves each row's images with it (TRL's own
per-row split), and passes no image inputs to a chunk without images. Batches whose every row has images go to
TRL unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

#: Image inputs that are flat over the images of all rows (moved with their rows by TRL's per-row split).
FLAT_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "image_position_ids")  # fmt: skip
#: Image inputs with one entry per row.
ROW_IMAGE_KEYS = ("num_images", "num_tiles")


def has_text_only_rows(image_inputs: dict[str, Any]) -> bool:
    """Whether image inputs are present and some row has no image (then TRL's chunks may get empty image tensors)."""
    num_images = image_inputs.get("num_images")
    return bool(num_images) and image_inputs.get("pixel_values") is not None and not all(num_images)


def chunk_image_inputs(image_inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The image inputs of rows ``start:end`` (all None when those rows have no image)."""
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    present = {key: value for key, value in image_inputs.items() if value is not None}
    per_row = split_pixel_values_by_grid(present)
    if sum(present["num_images"][start:end]) == 0:
        return {key: (value[start:end] if key not in (*FLAT_IMAGE_KEYS, *ROW_IMAGE_KEYS) else None)
                for key, value in per_row.items()}  # fmt: skip
    return unsplit_pixel_values_by_grid({key: value[start:end] for key, value in per_row.items()})


def logps_by_chunk(compute, model, input_ids, attention_mask, logits_to_keep, batch_size, image_inputs, **options):
    """``compute`` (TRL's ``_get_per_token_logps_and_entropies``) over chunks of ``batch_size`` rows, each with its
    own rows' images; the outputs joined as TRL joins its chunks (log-probs and entropies stacked, aux loss averaged).
    """
    batch_size = batch_size or input_ids.size(0)
    logps, entropies, aux = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        end = min(start + batch_size, input_ids.size(0))
        chunk_logps, chunk_entropies, chunk_aux = compute(
            model, input_ids[start:end], attention_mask[start:end], logits_to_keep, batch_size=end - start,
            **options, **chunk_image_inputs(image_inputs, start, end),
        )  # fmt: skip
        logps.append(chunk_logps)
        entropies.append(chunk_entropies)
        aux.append(chunk_aux)
    return (
        torch.cat(logps),
        None if entropies[0] is None else torch.cat(entropies),
        None if aux[0] is None else torch.stack(aux).mean(),
    )
