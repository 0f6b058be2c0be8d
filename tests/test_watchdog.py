"""The host watchdog that names a dead rank when the launcher kills every other rank before a
survivor can (issue 12): what it concludes from the order in which ranks ended, on real
processes and on manifests in every state."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import load
from microbench.runtime.results import MANIFEST, RunWriter, read_run
from microbench.runtime.watchdog import _watch_polling, conclude, first_to_end, watch


def open_run(path):
    w = RunWriter(path, {"probe": "t", "world_size": 3, "device": "cpu"})
    w.write_row({"case": "a", "status": "ok", "num_wrong": 0})
    return w


def sleeper(seconds):
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


@pytest.mark.parametrize("how", ["pidfd", "polling"])
def test_watch_orders_real_processes_by_when_they_ended(how):
    procs = {0: sleeper(1.2), 1: sleeper(0.3), 2: sleeper(1.2)}
    ranks = {r: p.pid for r, p in procs.items()}
    try:
        gone, ordered = watch(ranks) if how == "pidfd" else (_watch_polling(ranks, {}, poll_s=0.02), False)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert set(gone) == {0, 1, 2} and ordered == (how == "pidfd")
    assert first_to_end(gone, ordered=ordered) == 1


def test_ranks_that_end_together_name_nobody():
    assert first_to_end({0: 10.0, 1: 10.0, 2: 10.0}) is None  # seen in one wake-up
    assert first_to_end({0: 10.0, 1: 10.0002}) is None
    assert first_to_end({0: 10.5, 1: 10.0, 2: 10.6}) == 1
    assert first_to_end({3: 1.0}) == 3


def test_ranks_seen_in_one_wake_up_are_named_in_the_kernels_order():
    """Where the order is the kernel's (epoll's ready list), the first rank of a wake-up is named."""
    assert first_to_end({2: 10.0, 0: 10.0, 1: 10.0}, ordered=True) == 2
    assert first_to_end({0: 10.0, 1: 10.0002}, ordered=True) == 0


def zombie(p: subprocess.Popen) -> None:
    """Kill ``p`` and wait until it has ended (a zombie: not reaped, so its pid stays ours)."""
    p.kill()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {p.pid} did not end")


def watching(pid: int, n: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` has ``n`` descriptors registered in an epoll set (its
    fdinfo lists them as ``tfd:`` lines): the watchdog is watching its ranks."""
    end = time.monotonic() + timeout
    while True:
        count = 0
        for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
            try:
                count += sum(1 for ln in info.read_text().splitlines() if ln.startswith("tfd:"))
            except OSError:
                pass
        if count >= n:
            return
        if time.monotonic() >= end:
            raise AssertionError(f"process {pid} is not watching {n} processes")
        time.sleep(0.02)


def test_a_watchdog_that_wakes_late_still_names_the_rank_that_ended_first(tmp_path):
    """A loaded host (seen in CI: 4 ranks on 2 cores): the launcher's kill of the others came
    before the watchdog was scheduled, and it saw every exit in one wake-up. Here the watchdog
    is stopped (SIGSTOP) while rank 1 ends and then rank 0; resumed, it names rank 1 from the
    kernel's order of exits. Before, it named nobody (KeyError on first_ended)."""
    w = open_run(tmp_path / "r")
    a, b = sleeper(30), sleeper(30)
    dog = subprocess.Popen([sys.executable, "-m", "microbench.runtime.watchdog", str(w.dir), "h1",
                            f"0:{a.pid}", f"1:{b.pid}"])
    try:
        watching(dog.pid, 2)
        dog.send_signal(signal.SIGSTOP)
        zombie(b)
        zombie(a)
        dog.send_signal(signal.SIGCONT)
        assert dog.wait(timeout=20) == 0
    finally:
        for p in (a, b, dog):
            p.kill()
            p.wait()
    failure = read_run(w.dir)[0]["failure"]
    assert failure["first_ended"]["rank"] == 1 and failure["dead_ranks"] == [1]
    # resumed, it sees both exits in one wake-up (the kernel's order, the gap unknown) or, when
    # the first wake-up had begun before the stop, in two (a gap of a fraction of a millisecond)
    how = failure["first_ended"]["how"]
    assert "in the kernel's order of exits" in how or " ms before any other rank there" in how, how


def test_an_unclosed_run_is_closed_failed_naming_the_first_rank(tmp_path):
    w = open_run(tmp_path / "r")
    assert read_run(w.dir)[0]["status"] == "incomplete"
    assert conclude(w.dir, "h1", {0: 5.4, 1: 5.0, 2: 5.5}, settle_s=0) == "closed"
    man = read_run(w.dir)[0]
    assert man["status"] == "failed"
    assert man["failure"]["dead_ranks"] == [1] and man["failure"]["rank"] == 1
    assert man["failure"]["first_ended"]["rank"] == 1
    assert "rank 1 on h1 ended first" in man["failure"]["reason"]
    df = load(w.dir)  # no longer incomplete: loaded, and the rows say which rank died
    assert set(df["run_status"]) == {"failed"}
    assert json.loads(df["run_failure"][0])["dead_ranks"] == [1]


def test_an_unclosed_run_whose_ranks_ended_together_is_closed_without_a_name(tmp_path):
    w = open_run(tmp_path / "r")
    conclude(w.dir, "h1", {0: 5.0, 1: 5.0, 2: 5.0}, settle_s=0)
    man = read_run(w.dir)[0]
    assert man["status"] == "failed" and man["failure"]["rank"] is None
    assert "dead_ranks" not in man["failure"]


def test_a_survivors_failure_gets_the_rank_that_ended_first(tmp_path):
    """The survivor named every peer it found ended (the launcher had killed rank 0 too by
    then); the watchdog adds which one ended first, and keeps what the survivor saw."""
    w = open_run(tmp_path / "r")
    w.close(status="failed", failure={"rank": 2, "reason": "allreduce failed: a peer may have died",
                                      "dead_ranks": [0, 1]})
    assert conclude(w.dir, "h1", {0: 5.4, 1: 5.0, 2: 5.5}, settle_s=0) == "amended"
    failure = read_run(w.dir)[0]["failure"]
    assert failure["first_ended"]["rank"] == 1 and failure["dead_ranks"] == [0, 1]


def test_a_survivors_failure_gets_the_first_rank_from_the_kernels_order(tmp_path):
    """CI, 4 ranks on 2 cores: a survivor closed the run before it could see rank 0 gone, and
    the watchdog saw every exit in one wake-up; the kernel's order still names rank 0."""
    w = open_run(tmp_path / "r")
    w.close(status="failed", failure={"rank": 3, "reason": "allreduce failed: a peer may have died"})
    assert conclude(w.dir, "h1", {0: 5.0, 2: 5.0, 1: 5.0, 3: 5.0}, ordered=True, settle_s=0) == "amended"
    assert read_run(w.dir)[0]["failure"]["first_ended"]["rank"] == 0


def test_a_survivor_that_lost_a_peer_is_not_named_first_even_when_it_ended_first(tmp_path):
    """CI, 4 ranks on 2 cores, rank 3 SIGKILLed: rank 1's connection was reset (a killed
    process closes its sockets before its threads are gone), it closed the run and exited,
    and the kernel notified its exit before rank 3's. A rank that lost a peer was alive when
    the peer ended: the first is sought among the others."""
    from microbench.harness.lifecycle import PEER_LOST  # what abort_rank marks as peer_lost
    assert any(s in "Read error [127.0.0.1]:33163: Connection reset by peer." for s in PEER_LOST)
    w = open_run(tmp_path / "r")
    w.close(status="failed", failure={"rank": 1, "peer_lost": True, "closed_by_rank": 1,
                                      "reason": "RuntimeError: Connection reset by peer"})
    assert conclude(w.dir, "h1", {1: 5.0, 3: 5.0, 0: 5.0, 2: 5.0}, ordered=True, settle_s=0) == "amended"
    first = read_run(w.dir)[0]["failure"]["first_ended"]
    assert first["rank"] == 3 and "rank 1 left out" in first["how"]
    # without the mark (a rank that failed on its own error ends first): the kernel's order
    w = open_run(tmp_path / "r2")
    w.close(status="failed", failure={"rank": 1, "reason": "RuntimeError: out of memory"})
    conclude(w.dir, "h1", {1: 5.0, 3: 5.0, 0: 5.0, 2: 5.0}, ordered=True, settle_s=0)
    assert read_run(w.dir)[0]["failure"]["first_ended"]["rank"] == 1


@pytest.mark.parametrize("status, failure", [
    ("ok", None),
    ("interrupted", None),
    # a run that completed with a failed case: its ranks exit normally, whoever exits first
    ("failed", {"rank": None, "case": "a", "reason": "3 wrong element(s)", "num_cases": 1}),
    # already says who ended first
    ("failed", {"rank": 2, "reason": "x", "first_ended": {"rank": 0, "how": "signal SIGKILL"}}),
])
def test_a_closed_run_is_left_alone(tmp_path, status, failure):
    w = open_run(tmp_path / "r")
    w.close(status=status, **({"failure": failure} if failure else {}))
    before = (w.dir / MANIFEST).read_bytes()
    assert conclude(w.dir, "h1", {0: 5.4, 1: 5.0, 2: 5.5}, settle_s=0) == "left"
    assert (w.dir / MANIFEST).read_bytes() == before


def test_the_watchdog_process_closes_the_run_after_its_ranks_end(tmp_path):
    """End to end: the module started as the harness starts it, two 'ranks' that never close
    the run, the second killed first."""
    w = open_run(tmp_path / "r")
    a, b = sleeper(30), sleeper(30)
    dog = subprocess.Popen([sys.executable, "-m", "microbench.runtime.watchdog", str(w.dir), "h1",
                            f"0:{a.pid}", f"1:{b.pid}"])
    try:
        time.sleep(0.5)
        b.kill()
        time.sleep(0.5)
        a.kill()
        assert dog.wait(timeout=20) == 0
    finally:
        for p in (a, b, dog):
            p.kill()
            p.wait()
    man = read_run(w.dir)[0]
    assert man["status"] == "failed" and man["failure"]["first_ended"]["rank"] == 1


def test_bad_arguments_are_a_usage_error():
    res = subprocess.run([sys.executable, "-m", "microbench.runtime.watchdog", "/nonexistent", "h", "x:y"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage:" in res.stderr


def _ended_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _mark(run_dir, watchdog_pid, rank_pids):
    import socket

    from microbench.runtime.watchdog import marker
    marker(run_dir, socket.gethostname()).write_text(json.dumps(
        {"pid": watchdog_pid, "host": socket.gethostname(), "ranks": dict(enumerate(rank_pids))}))


def test_a_reader_waits_for_a_watchdog_closing_the_run(tmp_path):
    """Issue 17, where a launcher returns before the watchdog has written: the ranks have ended,
    their watchdog lives, so a reader waits for it (bounded) and says it did."""
    import threading

    from microbench.runtime.results import close_unclosed
    w = open_run(tmp_path / "r")
    dog = sleeper(30)
    _mark(tmp_path / "r", dog.pid, [_ended_pid(), _ended_pid()])

    def close_then_end():
        time.sleep(0.4)
        close_unclosed(tmp_path / "r", status="failed", failure={"rank": 1, "reason": "rank 1 died"})
        dog.kill()
        dog.wait()
    t = threading.Thread(target=close_then_end)
    t.start()
    problems: list[str] = []
    man, _ = read_run(tmp_path / "r", problems=problems)
    t.join()
    assert man["status"] == "failed" and man["failure"]["rank"] == 1
    assert len(problems) == 1 and "waited" in problems[0] and "to close the run: closed" in problems[0]
    w._rows.close()


def test_a_reader_does_not_wait_for_a_live_run(tmp_path):
    """Ranks still running: the run is in progress, not being closed; read at once as it is."""
    w = open_run(tmp_path / "r")
    dog, rank = sleeper(30), sleeper(30)
    try:
        _mark(tmp_path / "r", dog.pid, [rank.pid])
        problems: list[str] = []
        man, _ = read_run(tmp_path / "r", problems=problems)
        assert man["status"] == "incomplete" and problems == []  # no wait, nothing to say
    finally:
        for p in (dog, rank):
            p.kill()
            p.wait()
    w._rows.close()


MAPPER = """
import mmap, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
print("mapped", flush=True)
time.sleep(60)
"""


def mapper(path) -> subprocess.Popen:
    """A stand-in rank that maps a shared-memory file, as MPICH's ranks do from MPI_Init."""
    p = subprocess.Popen([sys.executable, "-c", MAPPER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "mapped"
    return p


def test_the_segments_of_ranks_that_could_not_finalize_are_removed_and_recorded(tmp_path):
    """Ranks killed (by the launcher, a signal) never reach MPI_Finalize, and MPICH's segment
    stays in RAM. The watchdog unlinks the segments its ranks mapped once they have all ended
    and nobody maps them; one that another live process still maps is kept."""
    from microbench.runtime.watchdog import SEGMENT_PREFIX
    w = open_run(tmp_path / "r")
    orphan = Path(f"{SEGMENT_PREFIX}pytest{os.getpid()}_0")
    shared = Path(f"{SEGMENT_PREFIX}pytest{os.getpid()}_1")
    a, b = mapper(orphan), mapper(shared)
    other = mapper(shared)  # not a rank of the run, still alive at the end
    dog = subprocess.Popen([sys.executable, "-m", "microbench.runtime.watchdog", str(w.dir), "h1",
                            f"0:{a.pid}", f"1:{b.pid}"])
    try:
        watching(dog.pid, 2)
        b.kill()
        time.sleep(0.3)
        a.kill()
        assert dog.wait(timeout=20) == 0
        assert not orphan.exists() and shared.exists()
        man = read_run(w.dir)[0]
        assert man["removed_shm"] == [str(orphan)]
        assert man["failure"]["first_ended"]["rank"] == 1
    finally:
        for p in (a, b, other, dog):
            p.kill()
            p.wait()
        for f in (orphan, shared):
            f.unlink(missing_ok=True)


def test_ranks_that_ended_before_they_were_watched_have_no_order():
    """Two ranks already ended (zombies) when the watch starts: epoll would hand them back in
    the order they were registered, not the order they died, so nobody is named."""
    a, b = sleeper(30), sleeper(30)
    try:
        zombie(b)
        zombie(a)
        gone, ordered = watch({0: a.pid, 1: b.pid})
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
    assert set(gone) == {0, 1} and ordered is False
    assert first_to_end(gone, ordered=ordered) is None


def test_the_starting_rank_goes_on_only_once_its_watchdog_watches(tmp_path):
    """start() returns once the watchdog watches every rank on the host (its marker is there
    and its process descriptors are registered), so a rank that dies in the first case dies
    watched; it passes the starting rank's MPICH segments, and starts none on a higher rank."""
    from microbench.runtime.watchdog import marker, start
    w = open_run(tmp_path / "r")
    a, b = sleeper(30), sleeper(30)
    assert start(w.dir, rank=1, hostnames=["h1", "h1"], pids=[a.pid, b.pid]) is None
    try:
        assert start(w.dir, rank=0, hostnames=["h1", "h1"], pids=[a.pid, b.pid]) is True
        assert marker(w.dir, "h1").exists()
        dog = json.loads(marker(w.dir, "h1").read_text())["pid"]
        watching(dog, 2, timeout=0)  # already, without waiting
        zombie(b)
        zombie(a)
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
    end = time.monotonic() + 20
    while marker(w.dir, "h1").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert read_run(w.dir)[0]["failure"]["first_ended"]["rank"] == 1
