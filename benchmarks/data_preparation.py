"""Data preparation throughput: tools/prepare_gld.py (files/s) and tools/extract_svd_frames.py (videos/s) with 1
and 2 jobs, on synthetic trees, whole processes timed as a user runs them.

    python benchmarks/data_preparation.py                       # 50,000 GLDv2 files, 200 videos
    python benchmarks/data_preparation.py --files 5000 --videos 20

The GLDv2 tree holds real JPEGs (64 x 48), so ``--verify_images`` decodes; the videos are 2.5 s of 64 x 48 mpeg4
at 10 fps. Real GLDv2 images (about 100 KB) and SVD videos (up to a minute, larger frames) cost more per file: the
extrapolations in benchmarks/README.md scale by count only and say so.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import yaml
from PIL import Image

from benchmarks import common

ROOT = common.REPO_ROOT


def gld_tree(root: Path, n_files: int, seed: int) -> None:
    """``n_files`` images in the official layout, 5 per landmark, each a distinct tiny JPEG."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    ids = [f"{i:016x}" for i in rng.choice(2**62, size=n_files, replace=False)]
    for image_id in ids:
        path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    rows = [f"{lm},{' '.join(ids[i:i + 5])}" for lm, i in enumerate(range(0, n_files, 5))]
    (root / "meta" / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(rows) + "\n")


def svd_tree(root: Path, n_videos: int, seed: int) -> Path:
    """``n_videos`` short videos and a yaml whose metadata lists them (as training videos)."""
    import av

    rng = np.random.default_rng(seed)
    videos = root / "videos"
    videos.mkdir(parents=True)
    ids = [f"v{i:05d}" for i in range(n_videos)]
    frames = [rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8) for _ in range(25)]
    for vid in ids:
        with av.open(str(videos / f"{vid}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for image in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    meta = root / "meta"
    meta.mkdir()
    (meta / "gt").write_text("".join(f"{a}.mp4 {b}.mp4 1\n" for a, b in zip(ids[::2], ids[1::2])))
    for name in ("query", "labeled", "unlabeled"):
        (meta / name).write_text("")
    config = {"query_id": str(meta / "query"), "labeled_id": str(meta / "labeled"),
              "unlabeled_id": str(meta / "unlabeled"), "train_groundtruth": str(meta / "gt"),
              "test_groundtruth": str(meta / "gt"), "video_root_paths": [str(videos)],
              "frame_root_path": str(root / "frames"), "frame_count_file": str(root / "counts")}
    (root / "svd.yaml").write_text(yaml.safe_dump(config))
    return root / "svd.yaml"


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000, help="GLDv2 images of the synthetic tree")
    parser.add_argument("--videos", type=int, default=200, help="SVD videos of the synthetic tree")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    common.add_common_args(parser, repeats=1, warmup=0)
    args = parser.parse_args(argv)
    device = common.setup(args)
    machine = common.machine_info(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with common.stage(f"synthetic GLDv2 tree of {args.files} images"):
            gld_tree(work / "gld", args.files, args.seed)
        with common.stage(f"{args.videos} synthetic videos"):
            meta = svd_tree(work / "svd", args.videos, args.seed)
        for jobs in args.jobs:
            for verify in (False, True):
                cmd = [sys.executable, str(ROOT / "tools" / "prepare_gld.py"), "--gld_root_path", str(work / "gld"),
                       "--jobs", str(jobs), "--no_progress"] + (["--verify_images"] if verify else [])
                seconds = timed(cmd)
                rows.append({"tool": "prepare_gld.py" + (" --verify_images" if verify else ""), "jobs": jobs,
                             "items": args.files, "seconds": seconds, "per_s": args.files / seconds,
                             "extrapolated_h": 1_580_470 / (args.files / seconds) / 3600, "of": "1.58M images"})
            frames = work / "svd" / "frames"
            subprocess.run(["rm", "-rf", str(frames), str(work / "svd" / "counts")], check=True)
            seconds = timed([sys.executable, str(ROOT / "tools" / "extract_svd_frames.py"), "-dm", str(meta),
                             "--jobs", str(jobs), "--no_progress"])
            rows.append({"tool": "extract_svd_frames.py (1 fps)", "jobs": jobs, "items": args.videos,
                         "seconds": seconds, "per_s": args.videos / seconds,
                         "extrapolated_h": 500_000 / (args.videos / seconds) / 3600, "of": "500k videos"})
    common.print_table(f"Data preparation, whole processes [{common.describe_machine(machine)}]", rows,
                       [("tool", "tool", ""), ("jobs", "jobs", "d"), ("items", "files/videos", "d"),
                        ("seconds", "wall (s)", ".1f"), ("per_s", "per s", ".0f"),
                        ("extrapolated_h", "extrapolated (h)", ".2f"), ("of", "to", "")])
    common.write_json(args.json, "data_preparation", args, machine, {"rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
