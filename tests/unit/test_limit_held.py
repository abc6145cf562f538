"""Which limit killed a worker: read from the compute's cgroup files (v1 and v2), said once per
death and the same way everywhere (logic only: the real kill is in
tests/security/test_session_boundary.py)."""

from types import SimpleNamespace

from flowsession.backends.compute.limits import Limits
from flowsession.sessions.held import LimitWatch

KILLED = "worker 12 was killed by SIGKILL while running a line; a new worker took its place"


def _compute(tmp_path, mode, **extra):
    limits = {"mode": mode, "paths": [str(tmp_path)], **extra}
    return SimpleNamespace(id="c1", vm_size="small", memory_bytes=2_000_000_000,
                           compute_handle=SimpleNamespace(limits=limits))


def _watch(compute):
    return LimitWatch(SimpleNamespace(get=lambda cid, user: compute))


SESSION = SimpleNamespace(id="s1", compute_id="c1", owner="bob")


def test_v1_oom_control_and_v2_memory_events_are_read(tmp_path):
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert Limits.memory_kills({"mode": "cgroup1", "paths": [str(tmp_path)]}) == 3
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n"
                                            "oom_group_kill 0\n")
    assert Limits.memory_kills({"mode": "cgroup2", "paths": [str(tmp_path)]}) == 2
    assert Limits.memory_kills({"mode": "rlimit", "paths": []}) is None


def test_a_sigkill_by_the_oom_killer_names_the_memory_limit_and_size(tmp_path):
    (tmp_path / "memory.oom_control").write_text("oom_kill 1\n")
    watch = _watch(_compute(tmp_path, "cgroup1"))
    said = watch.explain(SESSION, KILLED)
    assert said.startswith(KILLED)
    assert "memory limit of its VM size small (2.0 GB) held" in said, said
    # the same death reads the same in the session's events and its failure reason
    assert watch.explain(SESSION, "worker 12 was killed by SIGKILL: 4 workers died") \
        .endswith(said.split(" -- ", 1)[1])


def test_a_sigkill_the_oom_killer_did_not_do_is_left_as_it_is(tmp_path):
    (tmp_path / "memory.oom_control").write_text("oom_kill 0\n")
    assert _watch(_compute(tmp_path, "cgroup1")).explain(SESSION, KILLED) == KILLED
    (tmp_path / "memory.oom_control").write_text("oom_kill 1\n")
    watch = _watch(_compute(tmp_path, "cgroup1"))
    assert "memory limit" in watch.explain(SESSION, KILLED)
    # a second SIGKILL with no new OOM kill: not the memory limit's doing
    other = KILLED.replace("worker 12", "worker 13")
    assert watch.explain(SESSION, other) == other


def test_memory_error_under_rlimit_names_the_address_space_limit(tmp_path):
    watch = _watch(_compute(tmp_path, "rlimit", address_space_bytes=2_000_000_000))
    said = watch.explain(SESSION, "line failed: MemoryError")
    assert "memory limit of its VM size small (2.0 GB) held" in said and "RLIMIT_AS" in said


def test_a_compute_that_cannot_be_read_leaves_the_error_alone():
    def gone(cid, user):
        raise LookupError(cid)
    assert LimitWatch(SimpleNamespace(get=gone)).explain(SESSION, KILLED) == KILLED
