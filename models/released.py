"""The students the authors released, by the folder names of their download, and where a download puts them."""
from __future__ import annotations

from pathlib import Path

# name -> (student architecture, data it was distilled on)
RELEASED_STUDENTS = {
    "rg_rag_rs_to_r18_ep200": ("resnet18", "gldv2"),
    "ro_re_to_r18_ep3k": ("resnet18", "gldv2"),
    "ro_re_to_r34_ep3k": ("resnet34", "gldv2"),
    "mc_bt_to_r18_ep3k": ("resnet18", "svd"),
    "mc_bt_to_r34_ep3k": ("resnet34", "svd"),
}


def released_checkpoint(folder: str | Path, name: str) -> Path:
    """``<name>.pth``, ``<name>.pt`` or ``<name>/checkpoint*.pt*`` in ``folder`` (the first that exists; else the
    ``.pth`` name, reported as missing by whoever reads it)."""
    folder = Path(folder)
    for candidate in (folder / f"{name}.pth", folder / f"{name}.pt", *sorted((folder / name).glob("checkpoint*.pt*"))):
        if candidate.is_file():
            return candidate
    return folder / f"{name}.pth"
