"""Extract the SVD frames the scripts read, from the released videos.

    python tools/extract_svd_frames.py -dm config/svd.yaml [--fps 1] [--jobs 8] [--strict]

Every video of the metadata (``all_video_id`` when the yaml names it, and every id the scripts use) is looked up in
the yaml's ``video_root_paths`` (``<id>.mp4``), decoded with PyAV (FFmpeg; ``pip install -r
requirements-video.txt``) and written as ``{frame_root_path}/{video_id}/{i:04d}.jpg`` (0-based); then the
``frame_count_file`` lists ``<video_id> <count>`` for every extracted video.

The extraction rate is not in the paper's code: 1 frame per second by default, the common choice for
near-duplicate video retrieval (``--fps 0``: every frame). A video is written into a temporary folder and renamed
when complete, after a record of its ``--fps`` and ``--quality`` (``{frame_root_path}/.extraction/<id>.json``): a
killed run resumes where it stopped (complete videos are skipped), and a rerun with another rate never mixes rates:
it stops before any work unless ``--overwrite`` extracts those videos again. A missing or undecodable video is
listed in the report file and the summary, never dropped silently; ``--strict`` makes it an error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.svd.meta import SVDMeta, SVDMetaError, ordered_union, read_id_file  # noqa: E402
from utils.argtypes import PathCheckingParser, existing_file, finite_float, int_at_least, output_file  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import write_text  # noqa: E402
from utils.launch import run_tool  # noqa: E402
from utils.log import progress  # noqa: E402
from utils.workers import worker_pool  # noqa: E402

INSTALL = "pip install -r requirements-video.txt"
TMP_PREFIX = ".tmp-"


def get_args_parser() -> argparse.ArgumentParser:
    parser = PathCheckingParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("-dm", "--dataset_meta", default="config/svd.yaml", type=existing_file, metavar="FILE",
                        help="SVD metadata yaml with video_root_paths, frame_root_path and frame_count_file")
    parser.add_argument("--fps", type=finite_float(0.0), default=1.0,
                        help="frames per second to keep (default 1; 0: every frame)")
    parser.add_argument("--jobs", type=int_at_least(1), default=os.cpu_count() or 1,
                        help="videos decoded in parallel (default: the CPU count)")
    parser.add_argument("--quality", type=int_at_least(1, 100), default=90, help="JPEG quality (default 90)")
    parser.add_argument("--report", type=output_file, default=None, metavar="FILE",
                        help="the list of videos not extracted, with the reason (default: <frame_count_file>"
                             ".report.txt)")
    parser.add_argument("--strict", action="store_true", help="a missing or undecodable video is an error")
    parser.add_argument("--overwrite", action="store_true",
                        help="extract again the complete videos that were extracted with another --fps or --quality "
                             "(default: refuse to mix them, before any work)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def require_decoder() -> None:
    try:
        import av  # noqa: F401
    except ImportError:
        raise UserError(f"decoding videos needs PyAV (FFmpeg in its wheel): {INSTALL}") from None


def metadata_videos(meta: SVDMeta) -> list[str]:
    """Every video id the metadata names: all_video_id (if the yaml has it) and all ids the scripts read."""
    lists = []
    if meta.config.get("all_video_id") and Path(str(meta.config["all_video_id"])).is_file():
        lists.append(read_id_file(meta.config["all_video_id"]))
    lists += [meta.query_ids, meta.labeled_ids, meta.unlabeled_ids, meta.train_ids, meta.test_query_ids,
              meta.test_labeled_ids]
    return ordered_union(*lists)


def index_videos(roots: list[str]) -> dict[str, Path]:
    """``{video id: file}`` over the video folders (one listing each; the first folder wins for a repeated id)."""
    found: dict[str, Path] = {}
    for root in roots:
        if not Path(root).is_dir():
            raise SVDMetaError(f"video folder {root} (video_root_paths in the yaml) not found")
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.endswith(".mp4") and entry.is_file():
                    found.setdefault(entry.name[: -len(".mp4")], Path(entry.path))
    return found


RECORDS = ".extraction"  # under the frame root, <video id>.json: how that video's frames were made


def extraction_record(fps: float, quality: int) -> dict:
    return {"fps": float(fps), "quality": int(quality)}


def record_path(folder: Path) -> Path:
    return folder.parent / RECORDS / f"{folder.name}.json"


def recorded(folder: str) -> dict | None:
    """The record of a complete video folder (None: made by a version that kept none)."""
    try:
        return json.loads(record_path(Path(folder)).read_text())
    except (OSError, ValueError):
        return None


def extract_video(video: Path, folder: Path, fps: float, quality: int) -> tuple[int, str | None]:
    """Decode ``video`` into ``folder`` (renamed from a temporary folder when complete): (frames, error)."""
    import av

    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or 25)
            next_time = 0.0
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n / rate
                if fps > 0 and t < next_time - 1e-6:
                    continue
                frame.to_image().convert("RGB").save(tmp / f"{count:04d}.jpg", quality=quality)
                count += 1
                while fps > 0 and next_time <= t + 1e-6:
                    next_time += 1.0 / fps
        if count == 0:
            raise ValueError("no frame decoded")
    except Exception as exc:  # any decoding failure of one video is reported, the others go on
        shutil.rmtree(tmp, ignore_errors=True)
        return 0, f"undecodable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
    # the record first: a kill before the folder's rename leaves a record without a folder, redone next time
    write_text(record_path(folder), json.dumps(extraction_record(fps, quality)))
    os.replace(tmp, folder)
    return count, None


def count_frames(folder: Path) -> int:
    return sum(1 for name in os.listdir(folder) if name.endswith(".jpg"))


def _job(item: tuple[str, str | None, str, float, int]) -> tuple[str, int, str | None, bool]:
    """(video id, frames, error, extracted now) of one video; complete folders are only counted."""
    vid, video, folder, fps, quality = item
    folder = Path(folder)
    if folder.is_dir():
        return vid, count_frames(folder), None, False
    if video is None:
        return vid, 0, "missing: no <id>.mp4 in video_root_paths", False
    count, error = extract_video(Path(video), folder, fps, quality)
    return vid, count, error, error is None


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    require_decoder()
    meta = SVDMeta.from_yaml(args.dataset_meta)
    videos = metadata_videos(meta)
    roots = [str(r) for r in (meta.config.get("video_root_paths") or [])]
    if not roots:
        raise SVDMetaError(f"{args.dataset_meta} has no video_root_paths: the folders of the .mp4 files")
    frame_root = Path(meta.path_of("frame_root_path", must_exist=False))
    count_file = Path(meta.path_of("frame_count_file", must_exist=False))
    files = index_videos(roots)
    report = Path(args.report) if args.report else count_file.with_name(count_file.name + ".report.txt")
    missing = [v for v in videos if v not in files and not (frame_root / v).is_dir()]
    if missing and args.strict:
        raise UserError(f"{len(missing)} of {len(videos)} videos have no .mp4 in video_root_paths, e.g. "
                        f"{missing[:3]} (--strict)")
    frame_root.mkdir(parents=True, exist_ok=True)
    for stale in frame_root.glob(f"{TMP_PREFIX}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    complete = [str(frame_root / v) for v in videos if (frame_root / v).is_dir()]
    wanted = extraction_record(args.fps, args.quality)
    with worker_pool(args.jobs) as pool:
        records = dict(zip(complete, pool.map(recorded, complete, chunksize=max(1, len(complete) // (8 * args.jobs)))))
    other = [f for f, r in records.items() if r is not None and r != wanted]
    if other and not args.overwrite:
        raise UserError(f"{len(other)} complete video(s) in {frame_root} were extracted with {records[other[0]]} "
                        f"(e.g. {Path(other[0]).name}), not {wanted}: rerun with their --fps/--quality to complete "
                        "them, or pass --overwrite to extract those videos again")
    for folder in other:
        shutil.rmtree(folder)
    unrecorded = sum(r is None for r in records.values())
    if unrecorded:
        print(f"note: {unrecorded} complete video folder(s) have no record of their --fps/--quality (extracted by an "
              "older version); they are kept as they are", flush=True)
    print(f"{len(videos)} videos in the metadata, {len(files)} .mp4 files in {len(roots)} folders; frames at "
          f"{'every frame' if args.fps == 0 else f'{args.fps:g} fps'} into {frame_root}", flush=True)
    jobs = [(v, str(files[v]) if v in files else None, str(frame_root / v), args.fps, args.quality) for v in videos]
    counts, failures, extracted, start = {}, {}, 0, time.perf_counter()
    with worker_pool(args.jobs) as pool:
        results = pool.map(_job, jobs, chunksize=max(1, min(64, len(jobs) // (8 * args.jobs) or 1)))
        for vid, count, error, now in progress(results, enabled=not args.no_progress, total=len(jobs),
                                               desc="videos", unit="video"):
            if error is None:
                counts[vid] = count
                extracted += now
            else:
                failures[vid] = error
    seconds = time.perf_counter() - start
    write_text(count_file, "".join(f"{v} {counts[v]}\n" for v in videos if v in counts))
    write_text(report, "".join(f"{v}\t{failures[v]}\n" for v in videos if v in failures))
    summary = {"videos": len(videos), "extracted": extracted, "already_complete": len(counts) - extracted,
               "failed": len(failures), "frames": sum(counts.values()), "seconds": seconds,
               "videos_per_s": extracted / seconds if seconds > 0 else 0.0}
    print(f"extracted {extracted} videos ({summary['frames']} frames in all, {summary['videos_per_s']:.1f} "
          f"videos/s), {summary['already_complete']} already complete, {len(failures)} not extracted; frame "
          f"counts: {count_file}", flush=True)
    if failures:
        examples = "; ".join(f"{v}: {e}" for v, e in list(failures.items())[:3])
        print(f"not extracted ({report}): {examples}", flush=True)
        if args.strict:
            raise UserError(f"{len(failures)} video(s) could not be extracted, listed in {report} (--strict)")
    return summary


if __name__ == "__main__":
    run_tool(main)
