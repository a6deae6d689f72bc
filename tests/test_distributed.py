"""The engine: 2-process gloo training step and PCA learning against one-process references, a descending
step, and world-size checks at launch."""
import argparse
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import (
    CHEAP_TEACHERS,
    HEAVY,
    assert_exit,
    error_line,
    fixed_transform,
    pca_args,
    pca_from_features,
    torch_threads,
    toy_gld,
    weights_dir,
)

from datasets.gld import GLDImageDataset, image_path, read_groups, read_image, read_image_ids
from engine.distill import Trainer, build_model
from engine.params import GLDTrainParams
from engine.pca import learn_pca
from models.loss import MultiTeacherDistillLoss
from models.pca_layer import load_pca_layer, pca_weight_path, save_pca_layer
from models.teachers import TEACHER_FILES, build_teacher
from utils.distributed import DistContext
from utils.errors import UserError
from utils.launch import init_distributed
from utils.log import MetricsWriter
from utils.runtime import seed_everything

WORLD = 2


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args() -> GLDTrainParams:
    return GLDTrainParams(arch="resnet18", teachers=list(CHEAP_TEACHERS), path_to_pretrained_weights=str(weights_dir()),
                          embed_dim=512, student_init="random", ckpt_dir="unused", gld_root_path=str(toy_gld()))


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)


def shard_embeddings(model, teachers, x1, x2):
    """The student's (train mode, as in the step) and the teachers' outputs for one shard, without gradient."""
    with torch.no_grad():
        s1, s2 = model(x1, x2)
        return {"s1": s1, "s2": s2, "t1": teachers(x1), "t2": teachers(x2)}


def gloo_worker(rank, port, out_dir, pca_ids):
    """Both 2-rank jobs in one spawn (process start-up dominates): a DDP training step and PCA learning."""
    torch.set_num_threads(1)
    ctx = init_distributed(rank, False, f"tcp://127.0.0.1:{port}", 0, WORLD)
    try:
        args = train_args()
        seed_everything(0)
        model, student, criterion = build_model(args, ctx)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
        trainer = Trainer(args, ctx, model, student, criterion, None, None, None, optimizer,
                          torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10, 1e-6),
                          torch.amp.GradScaler("cpu", enabled=False), MetricsWriter(None))
        x1, x2 = inputs()
        rows = slice(2 * rank, 2 * rank + 2)
        # what the step's loss sees, computed before it
        embeddings = shard_embeddings(model.module, criterion.teachers, x1[rows], x2[rows])
        loss = trainer.step(x1[rows], x2[rows])
        torch.save({"loss": loss, "grads": {n: p.grad for n, p in student.named_parameters()},
                    "params": dict(student.named_parameters()), "embeddings": embeddings}, out_dir / f"rank{rank}.pt")
        learn_pca(pca_args(dump_to=str(out_dir / "pca_two.pt"), embed_dim=4, batch_size=2),
                  GLDImageDataset(toy_gld(), pca_ids, fixed_transform()), ctx)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    ids = read_image_ids(toy_gld())[:7]  # 7 images over 2 ranks: padding must not add rows (B11)
    weights_dir(), weights_dir(HEAVY)  # written before the spawn
    torch.multiprocessing.spawn(gloo_worker, args=(free_port(), out, ids), nprocs=WORLD)
    return out, ids


@pytest.mark.slow
def test_ddp_step_gives_the_gradient_of_the_global_loss(two_ranks):
    """Each rank's loss is the global-batch loss times the world size (DDP then averages the gradients to the
    global gradient). A wrong world-size scaling, a missing gather or gradient flowing into the other ranks'
    shards errs by a factor of 2 or more; float32 rounding by orders of magnitude less. The tolerances below say
    where the difference between the two is set, each from what float32 rounding can produce."""
    out, _ = two_ranks
    args = train_args()
    seed_everything(0)
    model, student, criterion = build_model(args, DistContext())
    model.train()
    x1, x2 = inputs()
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    loss_fn = MultiTeacherDistillLoss(teachers=args.teachers)
    # 1. The loss: rank r's value / world size equals the one-process loss of the global batch built from the
    #    ranks' own embeddings. Same inputs, same arithmetic: only the rounding of the (4 x 512) products and the
    #    softmax sums differ, a few float32 ulps of the O(1) terms the KL subtracts (cross-entropy ~ log N).
    ranks_emb = [r["embeddings"] for r in results]
    glued = [torch.cat([e[k] for e in ranks_emb]) for k in ("s1", "s2")]
    glued += [[torch.cat([e[k][t] for e in ranks_emb]) for t in range(len(args.teachers))] for k in ("t1", "t2")]
    global_loss = sum(loss_fn(*glued).values())
    ulp_budget = 64 * torch.finfo(torch.float32).eps * math.log(4)  # 64 ulps of the cross-entropy scale
    for res in results:
        assert abs(float(res["loss"]) / WORLD - float(global_loss)) <= ulp_budget, (res["loss"], global_loss)
    # 2. Those embeddings are what one process computes on each rank's shard (CPU: per-process BatchNorm
    #    statistics): equal up to the rounding of a forward pass, ~1e-6 relative; a wrong shard or BatchNorm
    #    state is off by O(1).
    s1 = torch.cat([student(x1[:2]), student(x1[2:])])
    s2 = torch.cat([student(x2[:2]), student(x2[2:])])
    teachers = criterion.teachers
    t1 = [torch.cat(parts) for parts in zip(teachers(x1[:2]), teachers(x1[2:]))]
    t2 = [torch.cat(parts) for parts in zip(teachers(x2[:2]), teachers(x2[2:]))]
    for got, ref in zip(glued[:2] + glued[2] + glued[3], [s1, s2] + t1 + t2):
        assert float((got - ref.detach()).norm() / ref.detach().norm()) < 1e-4
    # 3. The gradient: DDP's averaged gradient equals the one-process gradient of the global loss. Relative to
    #    each tensor's norm: rounding differences of the forward (item 2) pass through a softmax at 1/T = 20 and
    #    BatchNorm over 2 images, which amplify them by ~1e2-1e3 at most; a scaling bug errs by >= 50 %.
    loss = sum(loss_fn(s1, s2, t1, t2).values())
    loss.backward()
    for res in results:
        for name, param in student.named_parameters():
            error = (res["grads"][name] - param.grad).norm() / param.grad.norm().clamp_min(1e-12)
            assert error < 1e-2, (name, float(error))
    for name in results[0]["params"]:  # identical optimizer steps on both ranks
        assert torch.equal(results[0]["params"][name], results[1]["params"][name])


@pytest.mark.slow
def test_pca_two_ranks_equals_one_with_odd_count(two_ranks, tmp_path):
    out, ids = two_ranks
    learn_pca(pca_args(dump_to=str(tmp_path / "one.pt"), embed_dim=4),
              GLDImageDataset(toy_gld(), ids, fixed_transform()), DistContext())
    two, one = load_pca_layer(out / "pca_two.pt"), load_pca_layer(tmp_path / "one.pt")
    torch.testing.assert_close(two.mean, one.mean, rtol=0, atol=1e-6)
    # the whitening up to the eigenvectors' signs
    torch.testing.assert_close(two.dvt.T @ two.dvt, one.dvt.T @ one.dvt, rtol=1e-3, atol=1e-3)
    assert int(two.n_0) == int(one.n_0)


def test_world_size_larger_than_the_launch_is_an_error(tmp_path, capsys):
    from gld_distill import main

    with pytest.raises(SystemExit) as exc:
        main(["-ts", *CHEAP_TEACHERS, "-c", str(tmp_path / "c"), "--gld_root_path", str(toy_gld()),
              "--path_to_pretrained_weights", str(weights_dir()), "--world_size", "3", "--device", "cpu"])
    assert_exit(exc, 2, "--world_size 3", err=capsys.readouterr().err)


def test_world_size_disagreeing_with_torchrun_is_an_error(tmp_path, monkeypatch, capsys):
    from gld_distill import main

    monkeypatch.setenv("RANK", "0")  # what torchrun --nproc_per_node=1 sets
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exc:
        main(["-ts", *CHEAP_TEACHERS, "-c", str(tmp_path / "c"), "--gld_root_path", str(toy_gld()),
              "--path_to_pretrained_weights", str(weights_dir()), "--world_size", "3", "--device", "cpu"])
    assert_exit(exc, 2, "--world_size 3", "1 process", err=capsys.readouterr().err)  # the flag, the launch's count


def toy_pairs(size: int = 32):
    """First and second images of each toy landmark, without augmentation."""
    root, tf = toy_gld(), fixed_transform(size)
    groups = read_groups(root)
    return tuple(torch.stack([tf(read_image(image_path(root, g[i]))) for g in groups]) for i in (0, 1))


@pytest.fixture(scope="module")
def fitted_weights(tmp_path_factory):
    """The cheap teachers with PCA files learned (8-d) on their own features of the toy pairs: the fused
    teacher similarities then carry structure for the student to learn."""
    root = tmp_path_factory.mktemp("fitted_weights")
    x1, x2 = toy_pairs()
    for name in CHEAP_TEACHERS:
        os.symlink(weights_dir() / TEACHER_FILES[name], root / TEACHER_FILES[name])
        teacher = build_teacher(name, weights_dir())
        with torch.no_grad():
            feats = F.normalize(teacher(torch.cat([x1, x2])), dim=-1)
        save_pca_layer(pca_from_features(feats, 8), pca_weight_path(root, name, 8))
    return root


def make_trainer(weights, loader=None, **overrides) -> Trainer:
    """A Trainer on one process over ``loader`` (a list of (x1, x2) batches), without the script around it."""
    args = train_args()
    args.path_to_pretrained_weights = str(weights)
    args.embed_dim = 8 if weights != weights_dir() else 512
    args.seed, args.log_every, args.no_progress, args.epochs, args.ckpt_dir = 0, 1, True, 1, "unused"
    vars(args).update(overrides)
    seed_everything(0)
    model, student, criterion = build_model(args, DistContext())
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    batches = argparse.Namespace(set_epoch=lambda epoch, skip=0: None)
    return Trainer(args, DistContext(), model, student, criterion, argparse.Namespace(), loader, batches, optimizer,
                   torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100, 1e-6),
                   torch.amp.GradScaler("cpu", enabled=False), MetricsWriter(None))


def test_training_steps_lower_the_loss_on_a_fixed_batch(fitted_weights):
    """The engine's step descends the distillation loss (student parameters, sign, schedule wired right)."""
    trainer = make_trainer(fitted_weights)
    x1, x2 = toy_pairs()
    teacher_state = {k: v.clone() for k, v in trainer.criterion.teachers.state_dict().items()}
    losses = [float(trainer.step(x1, x2)) for _ in range(5)]
    assert losses[-1] < 0.2 * losses[0], losses  # measured: 10.7 -> 0.73
    assert trainer.iteration == 5 and trainer.scheduler.last_epoch == 5
    for k, v in trainer.criterion.teachers.state_dict().items():  # teachers frozen, BN statistics included
        assert torch.equal(v, teacher_state[k]), k


def test_bf16_epoch_and_nan_stop(fitted_weights):
    x1, x2 = toy_pairs()
    record = make_trainer(fitted_weights, [(x1[:4], x2[:4])], amp="bf16").train_epoch(0)
    assert record["epoch"] == 1 and 0 < record["loss"] < float("inf")
    bad = x1[:4].clone()
    bad[0] = float("nan")
    with pytest.raises(UserError) as exc:
        make_trainer(fitted_weights, [(bad, x2[:4])]).train_epoch(0)
    assert_exit(exc, 1, "nan", "epoch 1", "iteration 1", "--lr")  # the value, where, and the flag to lower


def _fails_on_rank_one(args, ctx):
    dist.barrier()  # both ranks connected (a rank leaving during the other's gloo connect fails that one first)
    if ctx.rank == 1:
        raise UserError(f"bad file {args.path} (rank {ctx.rank})")


@pytest.mark.slow
def test_spawned_workers_user_error_ends_with_its_line_and_code(capfd):
    """The one-process-per-GPU path (here with CPU processes): a worker's user error is one line and the exit
    code of the launch, without the traceback torch.multiprocessing would add."""
    from utils.launch import _spawn

    args = argparse.Namespace(path="/data/x.jpg")
    with pytest.raises(SystemExit) as exc:
        _spawn(WORLD, (_fails_on_rank_one, args, False, f"tcp://127.0.0.1:{free_port()}", 0, WORLD))
    err = capfd.readouterr().err
    assert exc.value.code == 1
    assert error_line(err).endswith("error: bad file /data/x.jpg (rank 1)"), err  # the worker's own message, intact


def _record_threads(args, ctx):
    (args.out / f"rank{ctx.rank}.txt").write_text(f"{torch.get_num_threads()}\n{ctx.launch}")


@pytest.mark.slow
def test_spawned_cpu_ranks_share_the_cores(tmp_path, monkeypatch):
    """Two CPU ranks spawned on this node's cores compute with half of them each (more threads than cores spin
    against each other's), and the run's launch line says so."""
    from utils.launch import _spawn

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))  # each rank would start with every core
    _spawn(WORLD, (_record_threads, argparse.Namespace(out=tmp_path), False, f"tcp://127.0.0.1:{free_port()}", 0,
                   WORLD, "launch: one node", WORLD))
    for rank in range(WORLD):
        threads, launch = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert int(threads) == max(1, cores // WORLD)
        assert launch.startswith("launch: one node") and f"{threads} CPU thread" in launch


@pytest.mark.parametrize("threads, cores, processes, expected", [(4, 4, 2, 2), (2, 2, 3, 1), (2, 8, 2, 2),
                                                                 (3, 8, 1, 3)])
def test_a_cpu_rank_takes_its_share_of_the_cores_and_never_more_threads(monkeypatch, threads, cores, processes,
                                                                       expected):
    from utils.runtime import share_cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    with torch_threads(threads):
        assert share_cpu_threads(processes) == expected == torch.get_num_threads()


def test_a_one_pixel_image_survives_the_multiscale_descriptor():
    """At scale 1/2 a 1-pixel side vanished (an error); every image of a usual size is resized as before."""
    import torch.nn.functional as F

    from utils.features import PAPER_SCALES, multiscale, rescale

    x = torch.rand(1, 3, 37, 50)
    for s in PAPER_SCALES[1:]:
        assert torch.equal(rescale(x, s), F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
    assert rescale(torch.rand(1, 3, 1, 1), 0.5).shape == (1, 3, 1, 1)
    assert rescale(torch.rand(1, 3, 1, 9), 0.5).shape == (1, 3, 1, 4)
    out = multiscale(lambda t: t.mean(dim=(2, 3)), torch.rand(1, 3, 1, 1))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_metrics_of_a_removed_run_folder_are_one_clear_error(tmp_path):
    import shutil

    from utils.files import OutputError
    from utils.log import MetricsWriter

    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl")
    writer.write({"type": "iter", "iteration": 1})
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(OutputError, match="removed"):
        writer.write({"type": "iter", "iteration": 2})


def _ctrl_c_swallowed_by_a_finaliser(args, ctx):
    """What a DataLoader iterator's __del__ can do: the KeyboardInterrupt of a Ctrl-C is raised inside it, Python
    prints "Exception ignored" and the work goes on to its end."""
    import gc
    import signal

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, inside __del__
                pass

    Finalised()
    gc.collect()
    args.went_on = True


def test_a_ctrl_c_swallowed_by_a_finaliser_still_ends_with_130(capsys):
    from utils.launch import _worker
    from utils.preemption import EXIT_INTERRUPTED

    args = argparse.Namespace(went_on=False)
    with pytest.raises(SystemExit) as stop:
        _worker(0, _ctrl_c_swallowed_by_a_finaliser, args, False, "env://", 0, 1)
    assert args.went_on  # the interrupt was indeed swallowed where it was raised
    assert stop.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().endswith("interrupted")


def _sigterm_mid_work(args, ctx):
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
        pass
    args.went_on = True


def test_a_stop_signal_outside_training_exits_75_for_a_requeue(capsys):
    """Evaluation, PCA learning: before, SIGTERM killed the process (143) and the sbatch examples requeue on 75."""
    from utils.launch import _worker
    from utils.preemption import EXIT_PREEMPTED

    args = argparse.Namespace(went_on=False)
    with pytest.raises(SystemExit) as stop:
        _worker(0, _sigterm_mid_work, args, False, "env://", 0, 1)
    assert stop.value.code == EXIT_PREEMPTED and not args.went_on
    assert "SIGTERM" in capsys.readouterr().err
