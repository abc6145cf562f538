"""The test cluster itself: on loopback only, and stopped by its own pids."""

from __future__ import annotations

from helpers.netns import sockets
from helpers.ray_cluster import MiB, RayCluster

from flowsession.backends.compute.procs import alive, start_time


def test_the_cluster_listens_and_connects_on_loopback_only(ray_cluster, ray_driver):
    assert {n["NodeManagerAddress"] for n in ray_driver.nodes()} == {"127.0.0.1"}
    found = sockets()
    assert any(s.state == "LISTEN" and s.local.endswith(f":{ray_cluster.port}") for s in found)
    assert [s for s in found if s.off_loopback()] == []


def test_a_cluster_stops_by_its_own_pids_and_leaves_nothing(ray_cluster):
    other = RayCluster(head_cpus=1, head_memory=512 * MiB)
    seen = other.nodes["head"].pids()
    idents = {(pid, start_time(pid)) for pid in seen}
    assert len(seen) >= 4  # ray start, gcs_server, raylet, agents
    other.stop()
    assert [pid for pid, st in idents if alive(pid, st)] == []
    assert not other.dir.exists()
    # and the session's cluster is untouched
    assert ray_cluster.nodes["head"].proc.poll() is None


def test_the_loopback_check_flags_wildcards_and_other_addresses():
    from helpers.netns import Socket

    def off(local, peer):
        return Socket("tcp", "X", local, peer, "").off_loopback()

    assert not off("127.0.0.1:6379", "0.0.0.0:*")
    assert not off("[::ffff:127.0.0.1]:6379", "*:*")
    assert not off("[::ffff:127.0.0.1]:44262", "[::ffff:127.0.0.1]:6379")
    assert not off("[::1]:80", "[::1]:5000")
    assert off("0.0.0.0:6379", "0.0.0.0:*")
    assert off("*:6379", "*:*")
    assert off("[::]:6379", "[::]:*")
    assert off("127.0.0.1:5000", "192.0.2.2:6379")
    assert off("192.0.2.2:5000", "127.0.0.1:6379")
