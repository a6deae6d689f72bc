"""The GPU path, proven on CPU: the device-provenance harness itself, every script under it (through
``tools/gpu_check.py --device cpu``, one process and two gloo ranks), and each fix a CUDA/NCCL run needs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from device_harness import EXIT_FINDINGS, DeviceProvenance, run_in_process
from helpers import CHEAP_TEACHERS, ROOT, run_script, torch_threads, toy_gld, weights_dir

from utils.distributed import DistContext
from utils.errors import UsageError, UserError
from utils.launch import free_port

DEVICE = torch.device("cpu")  # what a CPU run's context calls its device; the harness tracks what it would be


# ------------------------------------------------------------------------------------------- the harness itself
def test_harness_flags_a_device_tensor_meeting_a_host_tensor():
    with DeviceProvenance() as mode:
        on_device = torch.zeros(3).to(DEVICE)
        host = torch.ones(3)
        _ = on_device + host
    assert len(mode.findings) == 1 and "mix add" in mode.findings[0]


def test_harness_allows_what_cuda_allows():
    with DeviceProvenance() as mode:
        on_device = torch.arange(6.0).to(DEVICE)
        made_there = torch.zeros(6, device=DEVICE)
        _ = on_device * torch.tensor(2.0)  # a 0-dim host tensor is a scalar
        _ = on_device[torch.tensor([0, 2])]  # host index tensors
        on_device[torch.tensor([1])] = 5.0
        _ = on_device + made_there + torch.ones_like(on_device) + on_device.new_zeros(6)
        back = on_device.cpu()  # a host copy, then host arithmetic
        _ = back + torch.ones(6)
        made_there.copy_(torch.ones(6))  # copies between memories
    assert mode.findings == []


def test_harness_follows_results_modules_and_data():
    with DeviceProvenance() as mode:
        layer = torch.nn.Linear(4, 2).to(DEVICE)
        out = layer(torch.randn(3, 4).to(DEVICE))
        _ = out.sum(dim=0) - torch.zeros(2)  # the result of an op with device inputs is on the device
    assert len(mode.findings) == 1
    with DeviceProvenance() as mode:
        layer = torch.nn.Linear(4, 2)  # never moved: its parameters stay on the host
        _ = layer(torch.randn(3, 4).to(DEVICE))
    assert len(mode.findings) == 1 and "linear" in mode.findings[0]


def test_harness_flags_collectives_given_host_tensors():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mode = DeviceProvenance()
        with mode.collectives_checked(), mode:
            dist.all_reduce(torch.ones(2).to(DEVICE))
            assert mode.findings == []
            dist.all_reduce(torch.ones(2))
            holder = [None]
            dist.all_gather_object(holder, {"a": 1})  # places its own buffers: not the caller's doing
        assert not hasattr(dist.all_reduce, "device_harness_original")  # the originals are back
        assert dist.all_reduce is dist.distributed_c10d.all_reduce
        assert len(mode.findings) == 1 and "collective all_reduce" in mode.findings[0]
    finally:
        dist.destroy_process_group()


def test_harness_tracks_child_processes_and_sets_the_exit_code(tmp_path):
    """The harness reaches every Python process of a command (here two torchrun ranks): one that hands a host
    tensor to a collective makes the whole command exit with EXIT_FINDINGS; the clean one exits 0."""
    script = tmp_path / "ranks.py"
    script.write_text("import sys, torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "x = torch.ones(2)\n"
                      "dist.all_reduce(x if sys.argv[1] == 'host' else x.to(torch.device('cpu')))\n"
                      "dist.destroy_process_group()\n")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    bad = run_script("tests/device_harness.py", *launch, "host", timeout=120)
    good = run_script("tests/device_harness.py", *launch, "device", timeout=120)
    assert bad.returncode == EXIT_FINDINGS, bad.stderr[-2000:]
    assert "collective all_reduce" in bad.stderr
    assert good.returncode == 0, good.stderr[-2000:]


# --------------------------------------------------------------------------------------------- the scripts
def test_training_runs_past_its_first_epoch_free_of_device_mixing(tmp_path):
    """The epoch record compared the GPU's win counts with a host tensor: every GPU run died there."""
    with torch_threads(1):
        mode = run_in_process("gld_distill.py", [
            "-a", "resnet18", "-ts", *CHEAP_TEACHERS, "-c", str(tmp_path / "run"), "--gld_root_path",
            str(toy_gld(n_landmarks=8, imgs_per_landmark=3, size=48, seed=1, n_singletons=1)),
            "--path_to_pretrained_weights", str(weights_dir()), "--student_init", "random", "--imsize", "32", "-b",
            "4", "--epochs", "1", "--num_workers", "0", "--no_progress", "--device", "cpu", "--embed_dim", "512"])
    assert mode.findings == []
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file()


@pytest.mark.slow
def test_gpu_check_on_cpu_passes_under_the_harness():
    """tools/gpu_check.py --device cpu: every script, one process and two gloo ranks, every step tracked."""
    res = run_script("tests/device_harness.py", "tools/gpu_check.py", "--device", "cpu", timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "DEVICE-MIX" not in res.stderr
    steps = [line for line in res.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(steps) >= 18 and not [s for s in steps if s.startswith("FAIL")], res.stdout
    skipped = [s for s in steps if s.startswith("SKIP")]
    assert len(skipped) == 2 and all("fp16" in s for s in skipped)  # fp16 needs a GPU; everything else ran


def test_gpu_check_refuses_cuda_without_a_gpu():
    res = run_script("tools/gpu_check.py", "--device", "cuda", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------- random generators
def test_items_are_seeded_without_touching_the_gpu_generators(monkeypatch):
    """torch.manual_seed reseeds every GPU's generator: with loading in the training process, the fusion
    strategies' draws on the GPU depended on the last item loaded."""
    import random

    from PIL import Image

    from datasets.sampler import SeededItems
    from datasets.transforms import GLDView
    from engine.teacher_cache import drawn_view

    def forbidden(*_):
        raise AssertionError("a GPU generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.rand(2), random.random()

    before = torch.get_rng_state(), random.getstate()
    first, again, other = SeededItems(Draws())[(0, 7)], SeededItems(Draws())[(0, 7)], SeededItems(Draws())[(0, 8)]
    assert torch.equal(first[0], again[0]) and first[1] == again[1]  # the item's seed decides its draws
    assert not torch.equal(first[0], other[0])
    params, pixels = drawn_view(GLDView(32), Image.new("RGB", (48, 40), (120, 30, 200)), 11)
    assert pixels.shape[-2:] == (32, 32) and params == drawn_view(GLDView(32), Image.new("RGB", (48, 40)), 11)[0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]  # restored


# ----------------------------------------------------------------------------------------------- launching
def test_each_process_gets_a_gpu_it_can_see():
    from utils.launch import gpu_index

    assert gpu_index(0, 8) == 0 and gpu_index(7, 8) == 7
    assert gpu_index(5, 1) == 0  # one GPU bound per task: every task sees it as GPU 0
    with pytest.raises(UserError, match="local rank 3"):
        gpu_index(3, 2)


def test_the_process_group_gets_no_device_id_and_barrier_names_the_gpu(monkeypatch):
    from utils import distributed, launch

    calls = {}
    monkeypatch.setattr(DistContext, "_current", None)  # the context init_distributed makes current goes at the end
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ctx = launch.init_distributed(1, True)  # torchrun's LOCAL_RANK 1 on a task bound to one GPU
    assert ctx.device == torch.device("cuda", 0) and calls["set_device"] == torch.device("cuda", 0)
    assert calls["init"]["backend"] == "nccl" and "device_id" not in calls["init"]

    assert DistContext.current() is ctx and ctx.world_size == 2  # the barrier below learns the world size here
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.setdefault("barrier", kw))
    distributed.barrier()
    assert calls["barrier"] == {"device_ids": [0]}


# ------------------------------------------------------------------------------------------------- numerics
@pytest.fixture
def restored_backends():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def test_precision_and_determinism_settings(restored_backends, monkeypatch):
    from utils.runtime import CUBLAS_DETERMINISTIC, configure_backends

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: True)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default on Ampere and newer
    configure_backends(gpu, "none")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # true float32
    assert not torch.backends.cudnn.benchmark  # evaluation: images of many sizes
    configure_backends(gpu, "tf32", fixed_input_size=True)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_backends(gpu, "tf32", deterministic=True, fixed_input_size=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    configure_backends(DEVICE, "none", fixed_input_size=True)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_amp_the_device_cannot_run_is_refused(monkeypatch):
    from utils.runtime import check_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(UsageError, match="bf16"):
        check_amp("bf16", torch.device("cuda", 0))
    check_amp("fp16", torch.device("cuda", 0))
    for amp in ("fp16", "tf32"):
        with pytest.raises(UsageError, match=amp):
            check_amp(amp, DEVICE)
    check_amp("bf16", DEVICE)


def test_bf16_on_a_gpu_without_it_stops_before_any_work(tmp_path, monkeypatch, capsys):
    import gld_distill

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(SystemExit) as stop:
        gld_distill.main(["-ts", *CHEAP_TEACHERS, "-c", str(tmp_path / "c"), "--gld_root_path", str(toy_gld()),
                          "--path_to_pretrained_weights", str(weights_dir()), "--amp", "bf16"])
    assert stop.value.code == 2 and "bf16" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_requirements_name_the_torch_the_code_needs():
    """safe_globals (the published checkpoints' allow-list) needs torch 2.5; torch.amp.GradScaler(device) 2.3."""
    line = next(x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("torch>"))
    floor = tuple(int(p) for p in line.split(">=")[1].split(".")[:2])
    assert floor >= (2, 5)
    assert hasattr(torch.serialization, "safe_globals")


# -------------------------------------------------------------------------------------------------- throughput
def test_loader_workers_live_for_the_whole_run(monkeypatch):
    """The same worker processes serve every epoch (the paper's 3,000 epochs would fork 24,000 processes per GPU)."""
    import argparse

    from datasets.sampler import ShardedEpochSampler
    from engine.distill import PREFETCH_BATCHES, TrainData, Trainer, make_loader

    class Units(ShardedEpochSampler):
        def make_batch(self, units):
            return units

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor(os.getpid())

    args = argparse.Namespace(seed=0, num_workers=1)
    data = TrainData(Pids(), Units(8, 4))
    loader, batches = make_loader(data, args, DistContext())
    assert loader.persistent_workers and loader.prefetch_factor == PREFETCH_BATCHES

    pids = []

    def consume(self, epoch, progress, batch_iter, n_iters):
        pids.extend(int(p) for batch in batch_iter for p in batch)
        return {}

    trainer = Trainer(None, DistContext(), torch.nn.Identity(), None, None, data, loader, batches, *[None] * 4)
    monkeypatch.setattr(Trainer, "_run_epoch", consume)
    for epoch in range(3):
        trainer.train_epoch(epoch)
    assert len(pids) == 24 and len(set(pids)) == 1 and pids[0] != os.getpid()


def test_every_rank_of_an_8_gpu_node_embeds_part_of_roxford():
    from engine.features import IMAGE_SHARD

    n_database, world = 4993, 8  # ROxford5k's database, one 8-GPU node, no +1M
    shards = -(-n_database // IMAGE_SHARD)
    per_rank = [len(range(shards)[rank::world]) for rank in range(world)]
    assert min(per_rank) >= 1 and max(per_rank) - min(per_rank) <= 1


# ------------------------------------------------------------------------------------------- PCA by moments
def numpy_pca(features: np.ndarray, dim2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An independent reference in float64: (mean, top eigenvalues descending, their eigenvectors as rows)."""
    mean = features.mean(axis=0)
    centred = features - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(features))
    order = np.argsort(values)[::-1][:dim2]
    return mean, values[order], vectors[:, order].T


def test_pca_from_moments_equals_an_independent_computation():
    from models.pca_layer import PCAWhitening

    rng = np.random.default_rng(0)
    n, dim1, dim2 = 3000, 64, 16
    scales = np.linspace(3.0, 0.1, dim1)  # well-separated variances: the axes are well defined
    basis, _ = np.linalg.qr(rng.standard_normal((dim1, dim1)))
    x = (rng.standard_normal((n, dim1)) * scales) @ basis.T + rng.standard_normal(dim1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xt = torch.from_numpy(x)
    layer = PCAWhitening(dim1, dim2)
    halves = [xt[: n // 3], xt[n // 3:]]  # two "ranks" of unequal size, summed
    layer.fit_moments(n, sum(h.sum(0) for h in halves), sum(h.T @ h for h in halves))
    mean, values, axes = numpy_pca(x, dim2)
    np.testing.assert_allclose(layer.mean.numpy()[0], mean, atol=1e-6)
    reference = axes / np.sqrt(values)[:, None]  # dvt's rows, up to their signs
    signs = np.sign((layer.dvt.double().numpy() * reference).sum(axis=1))
    np.testing.assert_allclose(layer.dvt.double().numpy() * signs[:, None], reference, rtol=0,
                               atol=2e-3 * np.abs(reference).max())
    direct = PCAWhitening(dim1, dim2).fit(xt.float())  # the paper's path on the whole matrix agrees
    probe = xt[:50].float()
    torch.testing.assert_close(layer(probe).abs(), direct(probe).abs(), rtol=0, atol=1e-3)


def test_pca_learning_memory_does_not_hold_the_features():
    """No rank keeps the (N, D) matrix: the flow reads moments, never features."""
    import inspect

    import engine.pca

    source = inspect.getsource(engine.pca.learn_pca)
    assert "feature_moments" in source and "fit_moments" in source and ".fit(" not in source


def test_harness_runner_refuses_no_command():
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "device_harness.py")], capture_output=True, text=True)
    assert res.returncode != 0 and "usage" in res.stderr
