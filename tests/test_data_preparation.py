"""From the official downloads to a first run: SVD frames extracted from videos, a GLDv2 tree checked and filtered,
revisitop archives laid out safely, the weights checked."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from helpers import CHEAP_TEACHERS, ROOT, assert_user_error, run_main, run_script, toy_gld, weights_dir

from datasets.gld import image_path, read_groups, read_image_ids
from datasets.svd.meta import read_frame_counts
from datasets.toy import make_toy_revisitop, make_toy_revisitop1m, make_toy_svd
from models.teachers import TEACHER_FILES

pytestmark = pytest.mark.slow


def write_video(path, n_frames, rate, size=(48, 32), seed=0):
    """A short mpeg4 video made with PyAV's own encoder: distinct random frames."""
    av = pytest.importorskip("av", reason="PyAV: pip install -r requirements-video.txt")
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(n_frames):
            image = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def svd_videos(tmp_path_factory):
    """The toy SVD metadata with videos instead of frames: 2.5 s each, at 10 fps or 4 fps; one training video is a
    corrupt file."""
    root = tmp_path_factory.mktemp("svd_videos")
    info = make_toy_svd(root, n_queries=2, n_train_queries=1, positives=1, negatives=1, n_unlabeled=2,
                        frames=(2, 3), size=32, seed=5)
    shutil.rmtree(root / "frames")
    (root / "num_frames").unlink()
    folders = info["video_root_paths"]
    videos = list(info["frame_counts"])
    corrupt = info["ids"]["train_query"][0]
    rates = {}
    for i, vid in enumerate(videos):
        target = root / "videos" / ("query" if i % 2 else "labeled-0") / f"{vid}.mp4"
        assert str(target.parent) in folders
        if vid == corrupt:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
        else:
            rates[vid] = 10 if i % 2 else 4
            write_video(target, int(2.5 * rates[vid]), rates[vid], seed=i)
    return root, info, rates, corrupt


def extract(root, *extra):
    return run_script("tools/extract_svd_frames.py", "-dm", root / "svd.yaml", "--jobs", 2, "--no_progress",
                      *extra)


def test_svd_frames_are_extracted_counted_and_evaluated(svd_videos, tmp_path):
    root, info, rates, corrupt = svd_videos
    res = extract(root, "--fps", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = read_frame_counts(root / "num_frames")
    assert set(counts) == set(rates) and corrupt not in counts  # reported, not dropped silently
    assert all(n == 5 for n in counts.values())  # 2.5 s at 2 frames per second: t = 0, 0.5, ..., 2.0
    for vid, n in counts.items():
        assert sorted(os.listdir(root / "frames" / vid)) == [f"{i:04d}.jpg" for i in range(n)]
    report = (root / "num_frames.report.txt").read_text()
    assert report.startswith(f"{corrupt}\tundecodable")
    assert "1 not extracted" in res.stdout and corrupt in res.stdout
    # svd_eval reads what was extracted (the corrupt video is a training video)
    torch.manual_seed(0)
    from models.students import build_student, student_checkpoint_state

    torch.save({"state_dict": student_checkpoint_state(build_student("resnet18"))}, tmp_path / "s.pt")
    ev = run_main("svd_eval.py", "-a", "resnet18", "-r", tmp_path / "s.pt", "-dm", root / "svd.yaml",
                    "--num_workers", 0, "--no_progress", "--crop_size", 32, "--output_json", tmp_path / "r.json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["n_queries"] == 2
    # --strict turns the corrupt video into an error (after extracting the others)
    strict = extract(root, "--fps", 2, "--strict")
    assert_user_error(strict, 1, root / "num_frames.report.txt")  # a data error naming the list of failed videos


def test_every_frame_and_resume_skip_complete_videos(svd_videos, tmp_path):
    root, info, rates, corrupt = svd_videos
    meta = tmp_path / "svd.yaml"
    import yaml

    config = yaml.safe_load((root / "svd.yaml").read_text())
    config.update(frame_root_path=str(tmp_path / "frames"), frame_count_file=str(tmp_path / "counts"))
    meta.write_text(yaml.safe_dump(config))
    res = run_script("tools/extract_svd_frames.py", "-dm", meta, "--fps", 0, "--jobs", 1, "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    first = read_frame_counts(tmp_path / "counts")
    assert first == {vid: int(2.5 * rate) for vid, rate in rates.items()}  # every frame
    victim = next(iter(first))
    shutil.rmtree(tmp_path / "frames" / victim)  # as if the run was killed before this video
    (tmp_path / "frames" / f".tmp-{victim}-999").mkdir()  # and had left its half-written folder
    again = run_script("tools/extract_svd_frames.py", "-dm", meta, "--fps", 0, "--jobs", 1, "--no_progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"extracted 1 videos ({sum(first.values())} frames in all" in again.stdout
    assert f"{len(first) - 1} already complete" in again.stdout
    assert read_frame_counts(tmp_path / "counts") == first
    assert not list((tmp_path / "frames").glob(".tmp-*"))


def test_another_rate_never_mixes_with_the_videos_already_complete(svd_videos, tmp_path):
    """Killed at --fps 0 and rerun at --fps 1, the complete videos kept every frame while the others got one per
    second, and the frame-count file mixed both."""
    root, info, rates, corrupt = svd_videos
    import yaml

    meta = tmp_path / "svd.yaml"
    config = yaml.safe_load((root / "svd.yaml").read_text())
    config.update(frame_root_path=str(tmp_path / "frames"), frame_count_file=str(tmp_path / "counts"))
    meta.write_text(yaml.safe_dump(config))
    run = lambda *flags: run_script("tools/extract_svd_frames.py", "-dm", meta, "--jobs", 1,  # noqa: E731
                                    "--no_progress", *flags)
    assert run("--fps", 0).returncode == 0
    every = read_frame_counts(tmp_path / "counts")
    shutil.rmtree(tmp_path / "frames" / next(iter(every)))  # as if killed before the last video
    refused = run("--fps", 1)
    assert_user_error(refused, 1, tmp_path / "frames", "--overwrite")  # the folder, and the flag that redoes it
    assert read_frame_counts(tmp_path / "counts") == every  # nothing written
    assert len([p for p in (tmp_path / "frames").iterdir() if not p.name.startswith(".")]) == len(every) - 1
    redone = run("--fps", 1, "--overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert read_frame_counts(tmp_path / "counts") == {vid: 3 for vid in rates}  # t = 0, 1, 2 s, every video
    again = run("--fps", 1)
    assert again.returncode == 0 and f"{len(rates)} already complete" in again.stdout


# ----------------------------------------------------------------------------------------------------- GLDv2
def test_filtered_lists_follow_the_images_once_they_are_restored(tmp_path):
    """The lists of usable images stayed as the first check wrote them after the missing image came back, while the
    tool said every image is present."""
    root = tmp_path / "gld"
    shutil.copytree(toy_gld(n_landmarks=8, imgs_per_landmark=3, size=48, seed=1, n_singletons=1), root)
    victim = read_groups(root)[0][0]
    saved = image_path(root, victim).read_bytes()
    image_path(root, victim).unlink()
    first = run_script("tools/prepare_gld.py", "--gld_root_path", root, "--jobs", 2, "--no_progress")
    assert first.returncode == 0 and victim not in (root / "meta" / "train_clean_available_ids.txt").read_text()
    image_path(root, victim).write_bytes(saved)
    second = run_script("tools/prepare_gld.py", "--gld_root_path", root, "--jobs", 2, "--no_progress")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "every image is present" in second.stdout
    listed = (root / "meta" / "train_clean_available_ids.txt").read_text().split()
    assert victim in listed and sorted(listed) == sorted(read_image_ids(root))
    assert read_groups(root, csv_name="meta/train_clean_available.csv") == read_groups(root)


def test_gld_tree_with_a_missing_and_a_corrupt_image_gives_filtered_lists(tmp_path):
    root = tmp_path / "gld"
    shutil.copytree(toy_gld(n_landmarks=8, imgs_per_landmark=3, size=48, seed=1, n_singletons=1), root)
    (root / "meta" / "train_clean_ids.txt").unlink()
    official = (root / "meta" / "train_clean.csv").read_bytes()
    groups = read_groups(root)
    missing, corrupt = groups[0][0], groups[1][1]
    image_path(root, missing).unlink()
    image_path(root, corrupt).write_bytes(image_path(root, groups[2][0]).read_bytes()[:200])  # a torn download
    res = run_script("tools/prepare_gld.py", "--gld_root_path", root, "--verify_images", "--jobs", 2,
                     "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "9 landmarks, 25 images, 8 landmarks with >= 2 images" in res.stdout
    assert "1 missing" in res.stdout and "1 corrupt" in res.stdout and missing in res.stdout
    assert (root / "meta" / "train_clean.csv").read_bytes() == official  # the official file is never modified
    assert len((root / "meta" / "train_clean_ids.txt").read_text().split()) == 25  # written when absent
    usable = (root / "meta" / "train_clean_available_ids.txt").read_text().split()
    assert len(usable) == 23 and missing not in usable and corrupt not in usable
    filtered = read_groups(root, csv_name="meta/train_clean_available.csv")
    assert sum(len(g) for g in filtered) == 22 and all(missing not in g and corrupt not in g for g in filtered)
    run = run_main("gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", tmp_path / "run",
                     "--gld_root_path", root, "--gld_csv", "meta/train_clean_available.csv",
                     "--path_to_pretrained_weights", weights_dir(), "--student_init", "random", "--imsize", 32,
                     "-b", 4, "--epochs", 1, "--num_workers", 0, "--no_progress")
    assert run.returncode == 0, run.stderr[-3000:]
    official_run = run_main("gld_distill.py", "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", tmp_path / "run2",
                              "--gld_root_path", root, "--path_to_pretrained_weights", weights_dir(),
                              "--student_init", "random", "--no_progress")
    assert_user_error(official_run, 1, "1 of 24", image_path(root, missing))  # how many, and which one
    pca = run_main("gld_pca_learn.py", "-t", "mocov3", "--gld_root_path", root, "--gld_ids",
                     "meta/train_clean_available_ids.txt", "--path_to_pretrained_weights", weights_dir(),
                     "--embed_dim", 8, "--imsize", 32, "--num_samples", -1, "--dump_to", tmp_path / "pca.pt",
                     "--num_workers", 0, "--no_progress")
    assert pca.returncode == 0, pca.stderr[-3000:]
    assert "extracted 23 x 2048 features" in pca.stdout  # every usable image, none of the two broken ones


# ------------------------------------------------------------------------------------------------- revisitop
def add_bytes(tar, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data) if kind == tarfile.REGTYPE else 0, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_archives_with_nested_folders_are_laid_out_safely(tmp_path):
    data = tmp_path / "data"
    make_toy_revisitop(data, "roxford5k", n_queries=2, n_db=9, size=32, seed=0)
    make_toy_revisitop(data, "rparis6k", n_queries=2, n_db=9, size=32, seed=1)
    r1m = make_toy_revisitop1m(data, n=4, size=32, seed=2)
    originals = {p.relative_to(data): p.read_bytes() for p in data.rglob("*.jpg")}
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "oxbuild_images.tgz", "w:gz") as tar:
        for p in (data / "roxford5k" / "jpg").iterdir():
            tar.add(p, arcname=f"oxbuild/images/{p.name}")
        add_bytes(tar, "oxbuild/README.txt", b"unexpected")
        add_bytes(tar, "../../evil.jpg", b"outside")
        add_bytes(tar, "oxbuild/link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
    with tarfile.open(archives / "paris_1.tgz", "w:gz") as tar:
        for p in (data / "rparis6k" / "jpg").iterdir():
            tar.add(p, arcname=f"paris/{p.stem.split('_')[0]}/{p.name}")
    with tarfile.open(archives / "revisitop1m.1.tar.gz", "w:gz") as tar:
        for name in r1m:
            tar.add(data / "revisitop1m" / "jpg" / name, arcname=f"revisitop1m/jpg/{name}")
    for name in ("roxford5k", "rparis6k", "revisitop1m"):
        shutil.rmtree(data / name / "jpg")
    res = run_script("tools/prepare_revisitop.py", "-dp", data, "--plus1m", "--extract", archives, "--no_progress")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert {p.relative_to(data): p.read_bytes() for p in data.rglob("*.jpg")} == originals
    assert f"{len(originals)} images written" in res.stdout
    assert "1 unexpected members skipped, 2 refused" in res.stdout and "README.txt" in res.stdout
    assert not (tmp_path / "evil.jpg").exists() and not list(tmp_path.rglob("link.jpg"))
    assert "ready" in res.stdout
    again = run_script("tools/prepare_revisitop.py", "-dp", data, "--plus1m", "--extract", archives,
                       "--no_progress")
    assert f"0 images written, {len(originals)} already in place" in again.stdout
    victim = next((data / "rparis6k" / "jpg").iterdir())
    victim.unlink()
    (data / "revisitop1m" / "jpg" / "stray.jpg").write_bytes(b"x")
    broken = run_script("tools/prepare_revisitop.py", "-dp", data, "--plus1m", "--no_progress")
    assert broken.returncode == 1 and victim.name in broken.stdout and "stray.jpg" in broken.stdout


def test_only_one_dataset_downloaded_is_laid_out_and_the_other_reported_absent(tmp_path):
    data = tmp_path / "data"
    make_toy_revisitop(data, "roxford5k", n_queries=2, n_db=9, size=32, seed=0)
    originals = {p.relative_to(data): p.read_bytes() for p in data.rglob("*.jpg")}
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "oxbuild_images.tgz", "w:gz") as tar:
        for p in (data / "roxford5k" / "jpg").iterdir():
            tar.add(p, arcname=f"oxbuild/{p.name}")
    shutil.rmtree(data / "roxford5k" / "jpg")
    res = run_script("tools/prepare_revisitop.py", "-dp", data, "--extract", archives, "--no_progress")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert {p.relative_to(data): p.read_bytes() for p in data.rglob("*.jpg")} == originals
    absent = [line for line in res.stdout.splitlines() if "rparis6k" in line]
    assert absent and "absent" in absent[0] and "ready: roxford5k:" in res.stdout
    named = run_script("tools/prepare_revisitop.py", "-dp", data, "-d", "roxford5k", "rparis6k", "--no_progress")
    assert named.returncode == 1 and "gnd_rparis6k.pkl" in named.stdout  # named with -d: required, and missing
    empty = run_script("tools/prepare_revisitop.py", "-dp", tmp_path / "empty", "--no_progress")
    assert_user_error(empty, 1, "gnd_roxford5k.pkl", "gnd_rparis6k.pkl")


# --------------------------------------------------------------------------------------------------- weights
def test_weights_check_names_the_missing_and_the_wrong_file(tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(weights_dir(), weights)
    (weights / "pca_weights" / "barlowtwins_pca_512d_svd_224x224_p1.pt").unlink()
    shutil.copy(weights / TEACHER_FILES["barlowtwins"], weights / TEACHER_FILES["mocov3"])  # the wrong file
    res = run_script("tools/check_weights.py", "--path_to_pretrained_weights", weights, "--teachers",
                     *CHEAP_TEACHERS)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = {line.split("|")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("| ")}
    assert "| yes | NO |" in lines["teacher mocov3"]
    assert "| yes | yes | 2048 |" in lines["teacher barlowtwins"]
    assert "| NO | NO |" in lines["PCA barlowtwins 512-d"] and "| yes | yes | 512 |" in lines["PCA mocov3 512-d"]
    # the fix for the missing PCA file: the script that makes it, for that teacher
    assert any("svd_pca_learn.py" in line and "-t barlowtwins" in line for line in res.stdout.splitlines()), res.stdout
    assert "Traceback" not in res.stderr
    ok = run_script("tools/check_weights.py", "--path_to_pretrained_weights", weights_dir(), "--teachers",
                    *CHEAP_TEACHERS)
    assert ok.returncode == 0 and "4 of 4 files present and loading" in ok.stdout


def test_weights_check_of_the_released_students(tmp_path):
    from models.students import build_student, student_checkpoint_state
    from utils.checkpoint import save_atomic

    ckpts = tmp_path / "ckpts"
    r18 = {"state_dict": student_checkpoint_state(build_student("resnet18", embed_dim=512))}
    save_atomic(r18, ckpts / "ro_re_to_r18_ep3k.pth")
    save_atomic(r18, ckpts / "ro_re_to_r34_ep3k" / "checkpoint_3000.pt")  # a ResNet18 where a ResNet34 belongs
    res = run_script("tools/check_weights.py", "--path_to_pretrained_weights", weights_dir(), "--teachers",
                     "mocov3", "--checkpoints", ckpts)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = {line.split("|")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("| ")}
    assert "| yes | yes | 512 |" in lines["student ro_re_to_r18_ep3k (resnet18)"]
    assert "| yes | NO |" in lines["student ro_re_to_r34_ep3k (resnet34)"]
    assert "| NO | NO |" in lines["student mc_bt_to_r18_ep3k (resnet18)"]
    assert "3 of 7 files present and loading" in res.stdout and "Traceback" not in res.stderr  # teacher, PCA, r18


def test_tools_are_where_the_readme_says(tmp_path):
    for tool in ("extract_svd_frames.py", "prepare_gld.py", "prepare_revisitop.py", "check_weights.py"):
        assert f"tools/{tool}" in (ROOT / "README.md").read_text(), tool
