"""Labelled image grids (PIL only): columns of image batches with column titles and row labels."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def label_grid(
    columns: list[torch.Tensor], column_titles: list[str], row_labels: list[str], cell: int = 128
) -> Image.Image:
    """Grid with one column per tensor [R, 3, H, W]; images scaled (nearest) to ``cell`` pixels."""
    rows = columns[0].shape[0]
    font = ImageFont.load_default()
    label_w = max(120, 7 * max((len(r) for r in row_labels), default=0) // 2)
    title_h = 18
    grid = Image.new("RGB", (label_w + cell * len(columns), title_h + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (batch, title) in enumerate(zip(columns, column_titles, strict=True)):
        draw.text((label_w + c * cell + 4, 3), title, fill="black", font=font)
        for r in range(rows):
            tile = to_pil(batch[r]).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + c * cell, title_h + r * cell))
    for r, label in enumerate(row_labels):
        words, lines, line = label.split(), [], ""
        for word in words:  # wrap to the label column
            if len(line) + len(word) + 1 > label_w // 7:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((4, title_h + r * cell + 4), "\n".join(lines), fill="black", font=font)
    return grid
