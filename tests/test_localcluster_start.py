"""A local cluster that cannot start says why, and keeps the logs its error points at."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from localcluster.cluster import LocalCluster
from localcluster.servers import ServerError

pytestmark = pytest.mark.timeout(90)


def test_a_cluster_that_fails_to_start_keeps_the_logs_it_names() -> None:
    # A node refuses a setting out of its range and exits at start.
    cluster = LocalCluster(
        nodes=1, force_embedded=True, env={"CALLMESH_ENDED_CALL_RETENTION_S": "-5"}
    )
    with pytest.raises(ServerError) as failed, cluster:
        pass
    assert "node-1 exited" in str(failed.value)
    assert cluster.log_dir is not None and cluster.log_dir.is_dir()
    assert "CALLMESH_ENDED_CALL_RETENTION_S" in (cluster.log_dir / "node-1.log").read_text()
    shutil.rmtree(cluster.log_dir)


def test_a_cluster_that_started_removes_the_logs_it_made() -> None:
    with LocalCluster(nodes=1, force_embedded=True) as cluster:
        logs = cluster.log_dir
        assert logs is not None and logs.is_dir()
    assert not logs.exists()


def test_the_not_ready_error_names_an_existing_directory() -> None:
    """Not ready in time: the error's log directory is there to read."""
    cluster = LocalCluster(nodes=1, force_embedded=True, ready_timeout_s=0.01)
    with pytest.raises(ServerError, match="not ready") as failed, cluster:
        pass
    named = re.search(r"logs in (\S+)", str(failed.value))
    assert named is not None and Path(named.group(1)).is_dir()
    shutil.rmtree(named.group(1))
