"""Launcher detection for every launcher, backend/device choice, rank grid (Megatron order)."""
import pytest

from microbench.runtime import launch, world
from microbench.model.grid import Grid
from microbench.runtime.launch import LaunchInfo, detect_launcher
from microbench.runtime.errors import UsageError


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
     LaunchInfo("torchrun", 3, 8, 1, 4)),
    ({"PALS_RANKID": "13", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "12"},
     LaunchInfo("pals", 13, None, 1, 12)),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, LaunchInfo("openmpi", 5, 6, 1, 2)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"},
     LaunchInfo("mpich", 2, 4, 0, 2)),
    ({"PMIX_RANK": "7"}, LaunchInfo("pmix", 7, None, 0, None)),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"},
     LaunchInfo("slurm", 9, 16, 1, None)),
    ({"MICROBENCH_EMBEDDED": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
     LaunchInfo("embedded", 1, 2, 1, None)),
])
def test_each_launcher_is_recognised(env, expected):
    assert detect_launcher(env) == expected


def test_no_launcher_means_embedded_world():
    assert detect_launcher({"HOME": "/root", "PATH": "/bin"}) is None


def test_slurm_allocation_shell_is_not_a_launch():
    # salloc exports SLURM_* but only srun steps have SLURM_STEP_ID: a bare python there
    # must start the embedded world, not wait for 16 ranks that never come.
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) is None


def test_pals_wins_over_pmix_variables_on_aurora():
    env = {"PALS_RANKID": "1", "PALS_LOCAL_RANKID": "1", "PMIX_RANK": "1"}
    assert detect_launcher(env).launcher == "pals"


def test_bad_rank_variable_is_a_usage_error():
    with pytest.raises(UsageError, match=r"PMI_RANK='x'"):
        detect_launcher({"PMI_RANK": "x", "PMI_SIZE": "2"})


def test_pals_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setattr(launch, "mpi_world", lambda **_: None)
    with pytest.raises(UsageError, match="no world size and mpi4py is not installed"):
        launch.resolve_world(LaunchInfo("pals", 0, None, 0, 12), timeout_s=10)


def test_pals_world_size_comes_from_mpi(monkeypatch):
    class Comm:
        def Get_size(self):
            return 24

        def Get_rank(self):
            return 13
    monkeypatch.setattr(launch, "mpi_world", lambda **_: Comm())
    info, comm = launch.resolve_world(LaunchInfo("pals", 13, None, 1, 12), timeout_s=10)
    assert info.world_size == 24 and info.rank == 13 and comm is not None


def test_rendezvous_prefers_environment(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch.rendezvous(LaunchInfo("mpich", 0, 2, 0), None) == ("10.0.0.1", 29500)


def test_rendezvous_broadcasts_rank0_address_over_mpi(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)

    class Comm:
        def Get_rank(self):
            return 1

        def bcast(self, obj, root):
            assert obj is None and root == 0  # rank 1 sends nothing, receives rank 0's
            return ("192.0.2.7", 41000)
    assert launch.rendezvous(LaunchInfo("mpich", 1, 2, 0), Comm()) == ("192.0.2.7", 41000)


@pytest.mark.parametrize("device, available, expected", [
    ("cpu", set(), "gloo"),
    ("cuda", set(), "nccl"),
    ("xpu", {"xccl"}, "xccl"),
])
def test_auto_backend_per_device(monkeypatch, device, available, expected):
    monkeypatch.setattr(world, "_backend_available", lambda name: name in available)
    assert world.choose_backend("auto", device) == expected


def test_xpu_without_xccl_falls_back_to_ccl_and_needs_the_bindings(monkeypatch):
    import builtins
    monkeypatch.setattr(world, "_backend_available", lambda name: False)
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "oneccl_bindings_for_pytorch":
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match="oneccl_bindings_for_pytorch"):
        world.choose_backend("auto", "xpu")


def test_backend_device_mismatch_is_refused():
    with pytest.raises(UsageError, match="--backend nccl needs --device cuda"):
        world.choose_backend("nccl", "cpu")
    with pytest.raises(UsageError, match="choose one of"):
        world.choose_backend("hccl", "cpu")


def test_cuda_request_without_gpu_is_a_usage_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no cuda device"):
        world.choose_device("cuda", 0)


def test_device_binding_by_local_rank(monkeypatch):
    import torch
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(i))
    dev, kind = world.choose_device("cuda", 6)
    assert kind == "cuda" and dev.index == 2 and calls == [2]


def test_grid_is_megatron_order():
    g = Grid(tp=2, pp=2, dp=2)
    assert g.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g.coords(5) == {"tp": 1, "dp": 0, "pp": 1}
    for r in range(8):
        assert g.rank_of(**g.coords(r)) == r


def test_tp_group_stays_inside_a_node_with_12_ranks_per_node():
    g = Grid(tp=12, pp=4, dp=2)
    node = [r // 12 for r in range(g.size)]
    assert all(len({node[r] for r in grp}) == 1 for grp in g.groups("tp"))
    assert all(len({node[r] for r in grp}) > 1 for grp in g.groups("pp"))


def test_srun_with_pmix_takes_the_local_rank_from_slurm():
    env = {"PMIX_RANK": "9", "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0"}
    info = detect_launcher(env)
    assert info.launcher == "slurm" and info.local_rank == 1


def test_pmix_local_rank_zero_is_a_value_not_a_gap():
    env = {"PMIX_RANK": "4", "PMIX_LOCAL_RANK": "0", "PALS_LOCAL_RANKID": "3"}
    assert detect_launcher(env).local_rank == 0


def test_slurm_compressed_tasks_per_node_is_not_an_error():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS_PER_NODE": "2(x3),1"}
    assert detect_launcher(env).local_size is None
