"""Check a GLDv2-clean download before training on it, and write the lists of the images that are usable.

    python tools/prepare_gld.py --gld_root_path GLD [--jobs 32] [--verify_images]

Reads ``meta/train_clean.csv``; checks that every listed image exists under ``train/a/b/c/<id>.jpg`` (parallel
stats), and with ``--verify_images`` that it decodes; prints a summary (landmarks, images, landmarks with >= 2
images, missing, corrupt, repeated, with examples). Writes ``meta/train_clean_ids.txt`` when it is absent. When
images are missing or corrupt it writes ``meta/train_clean_available.csv`` and ``meta/train_clean_available_ids.txt``
with the usable images only (a repeated image once); train on them with ``gld_distill.py --gld_csv
meta/train_clean_available.csv`` and ``gld_pca_learn.py --gld_ids meta/train_clean_available_ids.txt``. The
official files are never modified.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.gld import CSV_NAME, IDS_NAME, GLDDataError, image_path, read_landmarks  # noqa: E402
from utils.argtypes import existing_dir, int_at_least  # noqa: E402
from utils.files import write_text  # noqa: E402
from utils.launch import run_tool  # noqa: E402
from utils.log import progress  # noqa: E402
from utils.workers import worker_pool  # noqa: E402

AVAILABLE_CSV = "meta/train_clean_available.csv"
AVAILABLE_IDS = "meta/train_clean_available_ids.txt"
CHUNK = 2048


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--gld_root_path", required=True, type=existing_dir, metavar="GLD",
                        help="GLDv2 root: meta/train_clean.csv and train/")
    parser.add_argument("--jobs", type=int_at_least(1), default=32,
                        help="parallel stats (threads) or decodes (processes) (default 32)")
    parser.add_argument("--verify_images", action="store_true",
                        help="also decode every image (slow: about the cost of one training epoch's reads)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _exist(block: list[str]) -> list[bool]:
    return [Path(p).is_file() for p in block]


def _decodes(block: list[str]) -> list[bool]:
    from PIL import Image

    ok = []
    for path in block:
        try:
            with Image.open(path) as img:
                img.load()
            ok.append(True)
        except Exception:  # any decoding failure marks the image unusable
            ok.append(False)
    return ok


def check_all(paths: list[str], fn, jobs: int, processes: bool, desc: str, show: bool) -> list[bool]:
    blocks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    out: list[bool] = []
    with worker_pool(jobs, processes) as pool:
        for block in progress(pool.map(fn, blocks), enabled=show, total=len(blocks), desc=desc,
                              unit=f"x{CHUNK} files"):
            out.extend(block)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    root = Path(args.gld_root_path)
    rows = [(landmark, group) for landmark, group, _ in read_landmarks(root)]
    images = list(dict.fromkeys(i for _, group in rows for i in group))
    bad_ids = [i for i in images if len(i) < 3]
    if bad_ids:
        raise GLDDataError(f"{root / CSV_NAME} lists ids shorter than 3 characters, e.g. {bad_ids[:3]}; the "
                           "layout train/a/b/c/<id>.jpg needs at least 3")
    paths = [str(image_path(root, i)) for i in images]
    exists = check_all(paths, _exist, args.jobs, False, "stat", not args.no_progress)
    missing = {i for i, ok in zip(images, exists) if not ok}
    corrupt = set()
    if args.verify_images:
        present = [(i, p) for i, p, ok in zip(images, paths, exists) if ok]
        decodes = check_all([p for _, p in present], _decodes, args.jobs, True, "decode", not args.no_progress)
        corrupt = {i for (i, _), ok in zip(present, decodes) if not ok}
    repeated = sum(len(group) - len(set(group)) for _, group in rows)
    usable_rows = [(lm, [i for i in dict.fromkeys(group) if i not in missing and i not in corrupt])
                   for lm, group in rows]
    summary = {"landmarks": len(rows), "images": len(images),
               "landmarks_with_2_images": sum(len(set(g)) >= 2 for _, g in rows), "missing": len(missing),
               "corrupt": len(corrupt), "repeated_in_a_row": repeated,
               "usable_landmarks_with_2_images": sum(len(g) >= 2 for _, g in usable_rows)}
    print(f"GLDv2 {root / CSV_NAME}: {summary['landmarks']} landmarks, {summary['images']} images, "
          f"{summary['landmarks_with_2_images']} landmarks with >= 2 images", flush=True)
    for what, ids in (("missing", missing), ("corrupt", corrupt)):
        if ids:
            examples = [str(image_path(root, i)) for i in images if i in ids][:3]
            print(f"  {len(ids)} {what}, e.g. {', '.join(examples)}", flush=True)
    if repeated:
        print(f"  {repeated} image(s) listed twice in their landmark (kept once in the filtered lists)", flush=True)
    if not (root / IDS_NAME).is_file():
        write_text(root / IDS_NAME, "".join(f"{i}\n" for i in images))
        print(f"wrote {root / IDS_NAME} ({len(images)} ids)", flush=True)
    stale = (root / AVAILABLE_CSV).is_file() or (root / AVAILABLE_IDS).is_file()  # from a check before a repair
    if missing or corrupt or repeated or stale:
        usable = [i for _, g in usable_rows for i in g]
        write_text(root / AVAILABLE_CSV, "landmark_id,images\n" + "".join(
            f"{lm},{' '.join(g)}\n" for lm, g in usable_rows if g))
        write_text(root / AVAILABLE_IDS, "".join(f"{i}\n" for i in dict.fromkeys(usable)))
        print(f"wrote {root / AVAILABLE_CSV} and {root / AVAILABLE_IDS}: {len(set(usable))} usable images, "
              f"{summary['usable_landmarks_with_2_images']} landmarks with >= 2 of them. Train on them with "
              f"--gld_csv {AVAILABLE_CSV} / --gld_ids {AVAILABLE_IDS}", flush=True)
    if not (missing or corrupt or repeated):
        print("every image is present" + (" and decodes" if args.verify_images else ""), flush=True)
    return summary


if __name__ == "__main__":
    run_tool(main)
