"""Check (and lay out) revisited Oxford/Paris and the R1M distractors before evaluating on them.

    python tools/prepare_revisitop.py -dp DATA [--plus1m] [--extract ARCHIVES_DIR] [-d roxford5k]

The datasets checked are those whose ground truth is in place (one of the two is enough: the other is reported
absent), or those ``-d`` names, each then required.

Checks each dataset's ``gnd_<name>.pkl`` (read with the restricted unpickler: plain containers, numbers and numpy
arrays only) and that every image of its ``imlist``/``qimlist`` is in ``<name>/jpg/``; with ``--plus1m`` compares
``revisitop1m/revisitop1m.txt`` with the files under ``revisitop1m/jpg/`` (missing and unexpected files, with
examples). Exit code 1 when something is missing or broken.

``--extract ARCHIVES_DIR`` first lays the downloaded archives (the Oxford and Paris image tarballs,
``revisitop1m.{1..100}.tar.gz``; the ``gnd_*.pkl`` files and ``revisitop1m.txt`` must already be in place) out into
this layout, whatever folders the archives use inside: a member is kept when its name is an expected image
(Oxford/Paris by file name, R1M by the end of its path), and written to the path the scripts read. Nothing is
written outside ``-dp``: absolute names, ``..`` and links are refused; unexpected members are counted and reported.
Files already in place are not written again, so an interrupted extraction can be run again.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.oxford_paris import DATASETS, DISTRACTORS, DatasetError, load_ground_truth  # noqa: E402
from utils.argtypes import existing_dir, output_dir  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import OutputError, atomic_write, files_exist, read_text, stale_temporaries  # noqa: E402
from utils.launch import run_tool  # noqa: E402
from utils.log import progress  # noqa: E402

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_EXAMPLES = 10  # names kept per kind of problem (R1M holds a million members)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("-dp", "--data_path", required=True, type=output_dir, metavar="DATA",
                        help="the root the evaluation reads (-dp of oxford_paris_eval.py)")
    parser.add_argument("-d", "--dataset", nargs="+", default=None, choices=list(DATASETS),
                        help="datasets to check, each required (default: those whose gnd_<name>.pkl is in place; "
                             "the other is reported absent)")
    parser.add_argument("--plus1m", action="store_true", help="also check the R1M distractors")
    parser.add_argument("--extract", default=None, type=existing_dir, metavar="ARCHIVES_DIR",
                        help="lay the downloaded image archives of this folder out under -dp first")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def safe_relative(name: str) -> PurePosixPath | None:
    """A member or list name as a relative path inside its folder; None for absolute names and ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def r1m_names(data: Path) -> list[str]:
    listing = data / DISTRACTORS / f"{DISTRACTORS}.txt"
    if not listing.is_file():
        raise DatasetError(f"distractor list not found: {listing} (download revisitop1m.txt there)")
    names = [line.strip() for line in read_text(listing, DatasetError, "distractor list").splitlines() if line.strip()]
    unsafe = [n for n in names if safe_relative(n) is None]
    if unsafe:
        raise DatasetError(f"{listing} lists paths outside its folder, e.g. {unsafe[:3]}: refusing them")
    return names


def gnd_path(data: Path, name: str) -> Path:
    return data / name / f"gnd_{name}.pkl"


def expected_targets(data: Path, datasets: list[str], plus1m: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    """({image file name: target} for Oxford/Paris, {R1M relative path: target})."""
    by_name: dict[str, Path] = {}
    for name in datasets:
        gnd = load_ground_truth(gnd_path(data, name))
        for image in [*gnd["imlist"], *gnd["qimlist"]]:
            by_name[f"{image}.jpg"] = data / name / "jpg" / f"{image}.jpg"
    by_path = {n: data / DISTRACTORS / "jpg" / n for n in r1m_names(data)} if plus1m else {}
    return by_name, by_path


def target_of(member: PurePosixPath, by_name: dict[str, Path], by_path: dict[str, Path]) -> Path | None:
    if member.name in by_name:
        return by_name[member.name]
    for start in range(len(member.parts)):  # the archive's own leading folders, whatever they are
        tail = str(PurePosixPath(*member.parts[start:]))
        if tail in by_path:
            return by_path[tail]
    return None


def extract_archives(folder: Path, data: Path, by_name: dict[str, Path], by_path: dict[str, Path],
                     show: bool) -> dict:
    counts = {"written": 0, "already_present": 0, "unexpected": 0, "refused": 0}
    examples: dict[str, list[str]] = {"unexpected": [], "refused": []}
    archives = sorted(p for p in folder.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES))
    data = data.resolve()
    for archive in progress(archives, enabled=show, total=len(archives), desc="archives", unit="archive"):
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    rel = safe_relative(member.name)
                    target = target_of(rel, by_name, by_path) if rel is not None and member.isfile() else None
                    if rel is None or not (member.isfile() or target is not None):
                        counts["refused"] += 1
                        examples["refused"].append(f"{archive.name}:{member.name}")
                        continue
                    if target is None:
                        counts["unexpected"] += 1
                        if len(examples["unexpected"]) < MAX_EXAMPLES:
                            examples["unexpected"].append(f"{archive.name}:{member.name}")
                        continue
                    if not target.resolve().is_relative_to(data):  # never written outside -dp
                        counts["refused"] += 1
                        examples["refused"].append(f"{archive.name}:{member.name}")
                        continue
                    if target.is_file() and target.stat().st_size == member.size:
                        counts["already_present"] += 1
                        continue
                    with tar.extractfile(member) as src, atomic_write(target, "wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
                    counts["written"] += 1
        except OutputError:  # the archive is fine: the disk or the permissions of -dp are not (an OSError too)
            raise
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UserError(f"cannot read archive {archive} ({exc}); download it again") from None
    print(f"archives of {folder}: {counts['written']} images written, {counts['already_present']} already in place, "
          f"{counts['unexpected']} unexpected members skipped, {counts['refused']} refused (absolute, '..', links)",
          flush=True)
    for what, names in examples.items():
        if names:
            print(f"  {what}, e.g. {', '.join(names[:3])}", flush=True)
    return counts


def check_dataset(data: Path, name: str) -> list[str]:
    problems = []
    try:
        gnd = load_ground_truth(gnd_path(data, name))
    except DatasetError as exc:
        return [str(exc)]
    for what, names in (("database", gnd["imlist"]), ("query", gnd["qimlist"])):
        paths = [data / name / "jpg" / f"{n}.jpg" for n in names]
        missing = [p for p, ok in zip(paths, files_exist(paths)) if not ok]
        print(f"{name}: {len(paths) - len(missing)} of {len(paths)} {what} images present", flush=True)
        if missing:
            problems.append(f"{name}: {len(missing)} {what} image(s) missing, e.g. {missing[0]}")
    return problems


def check_r1m(data: Path) -> list[str]:
    try:
        names = r1m_names(data)
    except DatasetError as exc:
        return [str(exc)]
    folder = data / DISTRACTORS / "jpg"
    present, removed = set(), 0
    for top, _, files in os.walk(folder):
        rel = Path(top).relative_to(folder)
        for stale in stale_temporaries(top):  # a killed --extract's half-written images: ours to remove
            stale.unlink(missing_ok=True)
            removed += 1
        kept = [f for f in files if not (f.startswith(".") and f.endswith(".tmp"))]
        present.update(str(PurePosixPath(*rel.parts, f)) for f in kept)
    if removed:
        print(f"{DISTRACTORS}: removed {removed} temporary file(s) left by a killed extraction", flush=True)
    listed = set(names)
    missing = [n for n in names if n not in present]
    unexpected = sorted(present - listed)
    print(f"{DISTRACTORS}: {len(listed) - len(missing)} of {len(listed)} listed images present, {len(unexpected)} "
          "unexpected files", flush=True)
    problems = []
    if missing:
        problems.append(f"{DISTRACTORS}: {len(missing)} listed image(s) missing, e.g. {missing[:3]}")
    if unexpected:
        print(f"  unexpected (not in {DISTRACTORS}.txt, never read), e.g. {unexpected[:3]}", flush=True)
    return problems


def chosen_datasets(data: Path, named: list[str] | None) -> tuple[list[str], list[str]]:
    """(the datasets to check, those absent and not asked for): the ones ``-d`` names, else those whose ground truth
    is in place (many download only one of the two)."""
    if named:
        return list(dict.fromkeys(named)), []
    present = [name for name in DATASETS if gnd_path(data, name).is_file()]
    if not present:
        wanted = " and/or ".join(str(gnd_path(data, name)) for name in DATASETS)
        raise UserError(f"no ground truth under {data}: download {wanted} (-d names the datasets to check)")
    return present, [name for name in DATASETS if name not in present]


def main(argv: list[str] | None = None) -> list[str]:
    args = get_args_parser().parse_args(argv)
    data = Path(args.data_path)
    datasets, absent = chosen_datasets(data, args.dataset)
    for name in absent:
        print(f"{name}: absent (no {gnd_path(data, name)}), not checked; -d {name} requires it", flush=True)
    if args.extract:
        by_name, by_path = expected_targets(data, datasets, args.plus1m)
        extract_archives(Path(args.extract), data, by_name, by_path, not args.no_progress)
    problems = [p for name in datasets for p in check_dataset(data, name)]
    if args.plus1m:
        problems += check_r1m(data)
    if problems:
        for problem in problems:
            print(f"problem: {problem}", flush=True)
        raise SystemExit(1)
    print(f"ready: {', '.join(datasets + ([DISTRACTORS] if args.plus1m else []))}: every ground truth reads and every "
          "image is in place", flush=True)
    return problems


if __name__ == "__main__":
    run_tool(main)
