"""Small synthetic datasets in the exact on-disk formats of GLDv2 and revisited Oxford/Paris (+ R1M).

Every "landmark" is a synthetic scene (a gradient background with coloured, partly textured shapes) drawn once on
a square canvas; its images are views of that scene (crop, scale, shift, rotation, colour jitter, flip, blur), so
retrieval on the toy sets is meaningful. Everything is drawn with numpy + PIL from a seeded generator: the same
seed writes the same bytes. Sizes are tiny (64 px by default) so a full toy set is written in about a second.

Writers: :func:`make_toy_gld`, :func:`make_toy_revisitop` (``roxford5k``/``rparis6k`` and the shared
``revisitop1m`` distractors), :func:`make_toy_revisitop1m`. Further writers (e.g. SVD) go at the end of the file
and reuse :func:`render_scene` / :func:`render_view`.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

JPEG_QUALITY = 90

# independent random streams per writer, so adding one never changes the bytes another writes
_STREAM = {"gld": 1, "roxford5k": 2, "rparis6k": 3, "revisitop1m": 4, "svd": 5}

# view strengths: (side fraction of the scene canvas, centre jitter, max rotation (deg), colour jitter, max blur)
VIEW_STRENGTH = {
    "easy": ((0.60, 0.85), 0.08, 0.0, 0.10, 0.0),
    "hard": ((0.35, 0.55), 0.18, 25.0, 0.30, 1.2),
    "junk": ((0.50, 0.80), 0.12, 10.0, 0.15, 0.0),
}


def make_rng(seed: int, stream: str | int) -> np.random.Generator:
    """A generator for one writer; ``stream`` separates writers that share a seed."""
    tag = _STREAM[stream] if isinstance(stream, str) else int(stream)
    return np.random.default_rng([int(seed), tag])


# ---------------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------------
def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated random colour (one channel high, one low) so shapes stand out from the background."""
    c = rng.uniform(0, 255, size=3)
    hi, lo = rng.choice(3, size=2, replace=False)
    c[hi], c[lo] = rng.uniform(180, 255), rng.uniform(0, 70)
    return tuple(int(v) for v in c)


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A two-colour linear gradient with a faint sinusoidal texture, (side, side, 3) float."""
    c1, c2 = np.array(_colour(rng), float) * 0.6, np.array(_colour(rng), float) * 0.6
    angle, freq, phase = rng.uniform(0, 2 * math.pi), rng.uniform(2, 6), rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:side, 0:side] / side
    g = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0, 1)[..., None]
    texture = 12 * np.sin(2 * math.pi * freq * (x + 0.5 * y) + phase)[..., None]
    return c1 * (1 - g) + c2 * g + texture


def _stripes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A two-colour oriented stripe texture, the fill of the textured blobs."""
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    angle, period = rng.uniform(0, math.pi), rng.uniform(3, 8)
    y, x = np.mgrid[0:h, 0:w]
    on = (np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period) > 0)[..., None]
    return Image.fromarray(np.where(on, a, b).astype(np.uint8))


def render_scene(rng: np.random.Generator, side: int) -> Image.Image:
    """One synthetic landmark: a background and 4-7 shapes (ellipses, rotated boxes, triangles, striped blobs)."""
    img = Image.fromarray(np.clip(_background(rng, side), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 8))):
        kind = rng.choice(["ellipse", "box", "triangle", "stripes"])
        cx, cy = rng.uniform(0.2, 0.8, size=2) * side
        r = rng.uniform(0.07, 0.2) * side
        colour = _colour(rng)
        outline = tuple(v // 3 for v in colour)
        if kind == "ellipse":
            ry = r * rng.uniform(0.5, 1.0)
            draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=colour, outline=outline, width=2)
        elif kind in ("box", "triangle"):
            n = 4 if kind == "box" else 3
            start = rng.uniform(0, 2 * math.pi)
            pts = [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
                   for k in range(n)]
            draw.polygon(pts, fill=colour, outline=outline)
        else:
            box = [int(cx - r), int(cy - r), int(cx + r), int(cy + r)]
            mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
            ImageDraw.Draw(mask).ellipse([0, 0, mask.width - 1, mask.height - 1], fill=255)
            img.paste(_stripes(rng, mask.width, mask.height), box[:2], mask)
    return img


def render_view(scene: Image.Image, rng: np.random.Generator, out_size: tuple[int, int], strength: str = "easy",
                clutter: Image.Image | None = None) -> Image.Image:
    """A view of ``scene`` of size ``out_size`` (w, h); ``strength`` in VIEW_STRENGTH.

    ``junk`` views are occluded over most of their area (by ``clutter`` when given, else by grey noise), like the
    partial or barely visible landmarks the revisited protocol marks as junk.
    """
    (lo, hi), jitter, max_rot, colour_jitter, max_blur = VIEW_STRENGTH[strength]
    side = scene.width
    w, h = out_size
    crop = rng.uniform(lo, hi) * side
    cw, ch = (crop, crop * h / w) if w >= h else (crop * w / h, crop)
    cx, cy = side / 2 + rng.uniform(-jitter, jitter, size=2) * side
    cx = float(np.clip(cx, cw / 2, side - cw / 2))
    cy = float(np.clip(cy, ch / 2, side - ch / 2))
    src = scene
    if max_rot > 0:
        fill = tuple(int(v) for v in np.asarray(scene)[0, 0])
        src = scene.rotate(rng.uniform(-max_rot, max_rot), resample=Image.Resampling.BILINEAR, center=(cx, cy),
                           fillcolor=fill)
    view = src.resize((w, h), Image.Resampling.BILINEAR, box=(cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(view, dtype=np.float64)
    gain = 1 + rng.uniform(-colour_jitter, colour_jitter, size=3)
    shift = rng.uniform(-40, 40) * colour_jitter
    arr = np.clip(arr * gain + shift, 0, 255)
    view = Image.fromarray(arr.astype(np.uint8))
    if max_blur > 0:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0, max_blur)))
    if strength == "junk":
        view = _occlude(view, rng, clutter)
    return view


def _occlude(view: Image.Image, rng: np.random.Generator, clutter: Image.Image | None) -> Image.Image:
    """Cover 65-80% of the view (a band from one side), leaving a small part of the landmark visible."""
    w, h = view.size
    frac = rng.uniform(0.65, 0.8)
    if clutter is None:
        noise = rng.integers(60, 200, size=(h, w, 1)).repeat(3, axis=2).astype(np.uint8)
        cover = Image.fromarray(noise)
    else:
        cover = clutter.resize((w, h), Image.Resampling.BILINEAR)
    side = int(rng.integers(4))
    box = [(0, 0, int(w * frac), h), (w - int(w * frac), 0, w, h),
           (0, 0, w, int(h * frac)), (0, h - int(h * frac), w, h)][side]
    out = view.copy()
    out.paste(cover.crop(box), box[:2])
    return out


def _frame_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Landscape or portrait, long side ``size`` (like real photos, images differ in shape)."""
    short = max(8, int(round(size * rng.uniform(0.66, 0.8))))
    return (size, short) if rng.random() < 0.6 else (short, size)


def save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=JPEG_QUALITY)


def _hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 16-hex-character ids, like GLDv2 image ids."""
    ids: list[str] = []
    seen = set()
    while len(ids) < n:
        value = rng.bytes(8).hex()
        if value not in seen:
            seen.add(value)
            ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# GLDv2
# ---------------------------------------------------------------------------------------------------------------
def make_toy_gld(root: str | Path, n_landmarks: int = 8, imgs_per_landmark: int = 4, size: int = 64, seed: int = 0,
                 n_singletons: int = 0) -> dict[int, list[str]]:
    """Write a toy GLDv2-clean: ``meta/train_clean.csv``, ``meta/train_clean_ids.txt``, ``train/a/b/c/<id>.jpg``.

    ``n_singletons`` extra landmarks have a single image (the paper's loader drops groups with < 2 images).
    Returns ``{landmark_id: [image ids]}`` in CSV order.
    """
    if n_landmarks < 1 or imgs_per_landmark < 1:
        raise ValueError("make_toy_gld needs n_landmarks >= 1 and imgs_per_landmark >= 1")
    root = Path(root)
    rng = make_rng(seed, "gld")
    total = n_landmarks + n_singletons
    landmark_ids = sorted(int(v) for v in rng.choice(200_000, size=total, replace=False))
    counts = [imgs_per_landmark] * n_landmarks + [1] * n_singletons
    order = rng.permutation(total)  # singletons spread among the landmarks
    groups: dict[int, list[str]] = {}
    for slot, lid in zip(order, landmark_ids):
        n = counts[slot]
        scene = render_scene(rng, 2 * size)
        ids = _hex_ids(rng, n)
        for image_id in ids:
            strength = "easy" if rng.random() < 0.7 else "hard"
            save_jpeg(render_view(scene, rng, _frame_size(rng, size), strength),
                      root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
        groups[lid] = ids
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    with open(meta / "train_clean.csv", "w", newline="\n") as f:
        f.write("landmark_id,images\n")
        for lid in sorted(groups):
            f.write(f"{lid},{' '.join(groups[lid])}\n")
    with open(meta / "train_clean_ids.txt", "w", newline="\n") as f:
        for lid in sorted(groups):
            f.writelines(f"{image_id}\n" for image_id in groups[lid])
    return {lid: groups[lid] for lid in sorted(groups)}


# ---------------------------------------------------------------------------------------------------------------
# revisited Oxford / Paris and R1M
# ---------------------------------------------------------------------------------------------------------------
def _query_image(scene: Image.Image, clutter_scene: Image.Image, rng: np.random.Generator,
                 size: int) -> tuple[Image.Image, list[float]]:
    """A full query photo: a clear view of the landmark inside clutter, and the landmark's ``bbx`` [x1,y1,x2,y2]."""
    w, h = _frame_size(rng, size)
    canvas = render_view(clutter_scene, rng, (w, h), "hard")
    iw, ih = max(8, int(w * rng.uniform(0.55, 0.75))), max(8, int(h * rng.uniform(0.55, 0.75)))
    x1, y1 = int(rng.integers(0, w - iw + 1)), int(rng.integers(0, h - ih + 1))
    canvas.paste(render_view(scene, rng, (iw, ih), "easy"), (x1, y1))
    # revisitop's boxes are floats; keep them within the drawn region after PIL's rounding in crop()
    bbx = [x1 + 0.2, y1 + 0.3, x1 + iw - 0.2, y1 + ih - 0.4]
    return canvas, [round(v, 1) for v in bbx]


def make_toy_revisitop(root: str | Path, name: str = "roxford5k", n_queries: int = 6, n_db: int = 30,
                       size: int = 64, seed: int = 0, n_distractors: int = 0, n_scenes: int | None = None) -> dict:
    """Write ``<root>/<name>/gnd_<name>.pkl`` and ``<root>/<name>/jpg/*.jpg`` (+ R1M when ``n_distractors > 0``).

    Queries are spread over ``n_scenes`` landmarks (default ``max(2, n_queries // 2)``). About 60% of the database
    are views of those landmarks: clear views (``easy``), strong transforms (``hard``) and heavily occluded views
    (``junk``); the rest, and all distractors, show other scenes (negatives). The last landmark has no clear view,
    so its queries have no easy positive (excluded from the Easy mAP, like two ROxford queries). Query photos
    contain clutter around the landmark; ``bbx`` marks the landmark. Returns the pickled dict.
    """
    if n_queries < 1 or n_db < 2:
        raise ValueError("make_toy_revisitop needs n_queries >= 1 and n_db >= 2")
    root = Path(root)
    rng = make_rng(seed, name if name in _STREAM else 10 + sum(name.encode()))
    n_scenes = n_scenes or max(2, n_queries // 2)
    if n_db < 4 * n_scenes + 1:
        raise ValueError(f"make_toy_revisitop: n_db={n_db} is too small for {n_scenes} landmarks; use at least "
                         f"{4 * n_scenes + 1} (easy, hard and junk views of each, and one negative)")
    scenes = [render_scene(rng, 2 * size) for _ in range(n_scenes)]
    n_other = max(1, n_scenes // 2)
    others = [render_scene(rng, 2 * size) for _ in range(n_other)]

    # database: labelled views of the query landmarks, then negatives, in a shuffled order
    n_views = min(n_db - 1, max(4 * n_scenes, int(round(0.6 * n_db))))
    entries = []  # (scene index or -1, kind)
    for k in range(n_views):
        s = k % n_scenes
        kind = ("easy", "easy", "hard", "junk", "easy", "hard")[(k // n_scenes) % 6]
        if s == n_scenes - 1 and kind == "easy":
            kind = "hard"
        entries.append((s, kind))
    entries += [(-1, "negative")] * (n_db - n_views)
    entries = [entries[i] for i in rng.permutation(len(entries))]
    folder = root / name / "jpg"
    imlist = []
    for i, (s, kind) in enumerate(entries):
        clutter = others[int(rng.integers(n_other))]
        if s < 0:
            img = render_view(clutter, rng, _frame_size(rng, size), "hard" if rng.random() < 0.5 else "easy")
        else:
            img = render_view(scenes[s], rng, _frame_size(rng, size), kind, clutter=clutter)
        imlist.append(f"{name}_db_{i:06d}")
        save_jpeg(img, folder / f"{imlist[-1]}.jpg")

    qimlist, gnd = [], []
    for q in range(n_queries):
        s = q % n_scenes
        img, bbx = _query_image(scenes[s], others[int(rng.integers(n_other))], rng, size)
        qimlist.append(f"{name}_query_{q:03d}")
        save_jpeg(img, folder / f"{qimlist[-1]}.jpg")
        labels = {kind: [i for i, (si, k) in enumerate(entries) if si == s and k == kind]
                  for kind in ("easy", "hard", "junk")}
        gnd.append({"bbx": bbx, **labels})
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(cfg, f, protocol=2)
    if n_distractors > 0:
        make_toy_revisitop1m(root, n_distractors, size=size, seed=seed)
    return cfg


def make_toy_revisitop1m(root: str | Path, n: int = 10, size: int = 64, seed: int = 0) -> list[str]:
    """Write ``<root>/revisitop1m/revisitop1m.txt`` (relative paths incl. ``.jpg``) and the images under ``jpg/``."""
    root = Path(root) / "revisitop1m"
    rng = make_rng(seed, "revisitop1m")
    scenes = [render_scene(rng, 2 * size) for _ in range(max(1, n // 4))]
    lines = []
    for image_id in _hex_ids(rng, n):
        rel = f"{image_id[:1]}/{image_id[1:3]}/{image_id}.jpg"
        strength = "easy" if rng.random() < 0.5 else "hard"
        save_jpeg(render_view(scenes[int(rng.integers(len(scenes)))], rng, _frame_size(rng, size), strength),
                  root / "jpg" / rel)
        lines.append(rel)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "revisitop1m.txt", "w", newline="\n") as f:
        f.writelines(f"{line}\n" for line in lines)
    return lines


# ---------------------------------------------------------------------------------------------------------------
# SVD (videos as frame folders; metadata files in the SVD release formats)
# ---------------------------------------------------------------------------------------------------------------
def _toy_video(root: Path, scene: Image.Image, rng: np.random.Generator, size: int, frames: tuple[int, int],
               strength: str) -> int:
    """Write one "video" of ``scene``: ``n`` random views as ``<root>/<i:04d>.jpg``; returns ``n``."""
    n = int(rng.integers(frames[0], frames[1] + 1))
    w, h = (size, max(8, int(round(size * 0.75))))
    for i in range(n):
        save_jpeg(render_view(scene, rng, (w, h), strength), root / f"{i:04d}.jpg")
    return n


def make_toy_svd(root: str | Path, n_queries: int = 3, n_train_queries: int = 3, positives: int = 2,
                 negatives: int = 1, n_unlabeled: int = 4, frames: tuple[int, int] = (2, 5), size: int = 48,
                 seed: int = 0) -> dict:
    """Write a toy SVD: ``metadata-release/*`` (ids with ``.mp4``), ``frames/<id>/<i:04d>.jpg``, ``num_frames``
    (``id count``) and ``svd.yaml`` with the keys of ``config/svd.yaml`` pointing at them.

    Each query video shows its own scene; its ``positives`` labeled videos are other videos of that scene (near
    duplicates), its ``negatives`` labeled videos show other scenes (label 0). Training queries are separate
    from the test ones; unlabeled videos (distractors) show further scenes. Returns the yaml's dict plus
    ``"ids"`` (lists per role) and ``"frame_counts"``.
    """
    if min(n_queries, n_train_queries, positives, frames[0]) < 1 or frames[1] < frames[0]:
        raise ValueError("make_toy_svd needs >= 1 test/train query, positive and frame per video")
    root = Path(root)
    rng = make_rng(seed, "svd")
    n_videos = (n_queries + n_train_queries) * (1 + positives + negatives) + n_unlabeled
    ids = iter(_hex_ids(rng, n_videos))
    counts: dict[str, int] = {}

    def video(scene: Image.Image, strength: str) -> str:
        vid = next(ids)
        counts[vid] = _toy_video(root / "frames" / vid, scene, rng, size, frames, strength)
        return vid

    roles: dict[str, list[str]] = {"query": [], "labeled": [], "unlabeled": [], "train_query": [],
                                   "test_query": []}
    gt_lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, n in (("train", n_train_queries), ("test", n_queries)):
        for _ in range(n):
            scene = render_scene(rng, 2 * size)
            qid = video(scene, "easy")
            roles["query"].append(qid)
            roles[f"{split}_query"].append(qid)
            cands = [(video(scene, "easy" if k % 2 == 0 else "hard"), 1) for k in range(positives)]
            cands += [(video(render_scene(rng, 2 * size), "easy"), 0) for _ in range(negatives)]
            for j in rng.permutation(len(cands)):
                cid, label = cands[int(j)]
                roles["labeled"].append(cid)
                gt_lines[split].append(f"{qid}.mp4 {cid}.mp4 {label}")
    for _ in range(n_unlabeled):
        roles["unlabeled"].append(video(render_scene(rng, 2 * size), "easy" if rng.random() < 0.5 else "hard"))

    meta = root / "metadata-release"
    meta.mkdir(parents=True, exist_ok=True)
    files = {
        "all_video_id": ("all-video-id", [f"{v}.mp4" for v in counts]),
        "labeled_id": ("labeled-data-id", [f"{v}.mp4" for v in roles["labeled"]]),
        "unlabeled_id": ("unlabeled-data-id", [f"{v}.mp4" for v in roles["unlabeled"]]),
        "query_id": ("query-id", [f"{v}.mp4" for v in roles["query"]]),
        "groundtruth": ("groundtruth", gt_lines["train"] + gt_lines["test"]),
        "train_groundtruth": ("train_groundtruth", gt_lines["train"]),
        "test_groundtruth": ("test_groundtruth", gt_lines["test"]),
    }
    config: dict = {}
    for key, (name, lines) in files.items():
        with open(meta / name, "w", newline="\n") as f:
            f.writelines(f"{line}\n" for line in lines)
        config[key] = str((meta / name).resolve())
    config["video_root_paths"] = [str((root / "videos" / part).resolve()) for part in ("query", "labeled-0")]
    with open(root / "num_frames", "w", newline="\n") as f:
        f.writelines(f"{vid} {n}\n" for vid, n in counts.items())
    config.update(frame_root_path=str((root / "frames").resolve()),
                  frame_count_file=str((root / "num_frames").resolve()),
                  feature_root_path=str((root / "features").resolve()))
    with open(root / "svd.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return {**config, "ids": roles, "frame_counts": counts}

