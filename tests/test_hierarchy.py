"""The node layout of the two-level exchange (hierarchy.py), without MPI: the slices tile the
arena with an equal part per node, partners cover every foreign slice once, and the bytes per
node are one replica's all-reduce, 2 (nodes - 1)/nodes x P, whatever the workers per node."""
import numpy as np
import pytest

from mpitrain.trainer.hierarchy import NodeLayout, split, traffic_statistics

LAYOUTS = [[[0, 1, 2, 3, 4]], [[0, 1], [2, 3]], [[0], [1, 2, 3], [4]], [[0, 2], [1, 3, 4]],
           [[w] for w in range(7)], [[0, 1, 2, 3, 4, 5], [6]]]


@pytest.mark.parametrize("nodes", LAYOUTS)
@pytest.mark.parametrize("n", [1000, 1003, 37376])
def test_slices_and_partners(nodes, n):
    lay = NodeLayout(nodes)
    counts, displs = lay.slices(n)
    order = np.argsort(displs)
    assert displs[order[0]] == 0 and sum(counts) == n
    for a, b in zip(order[:-1], order[1:]):                 # contiguous, no gap, no overlap
        assert displs[a] + counts[a] == displs[b]
    owned = [sum(counts[w] for w in m) for m in lay.nodes]
    assert owned == split(n, lay.num_nodes)                # equal per node up to one float
    for q, members in enumerate(lay.nodes):
        for v in range(lay.num_workers):
            if lay.node_of[v] != q:
                assert lay.partner(q, v) in members
        got = sorted(v for w in members for v in lay.partnered(w))
        assert got == [v for v in range(lay.num_workers) if lay.node_of[v] != q]
    m = lay.num_nodes
    for b in lay.remote_bytes_per_node(n):
        assert b <= 2 * (m - 1) / m * 4 * n + 8 * m        # + rounding of the per-node split


def test_one_node_keeps_the_flat_slices():
    assert NodeLayout([list(range(11))]).slices(1003)[0] == split(1003, 11)
    assert split(10, 3) == [4, 3, 3]


def test_layout_from_keys_and_order():
    lay = NodeLayout.from_keys(["b", "a", "b", "a", "c"])
    assert lay.nodes == [[0, 2], [1, 3], [4]]
    assert lay.sum_order(0) == [2, 1] and lay.sum_order(2) == [1, 0]


def test_traffic_statistics():
    counters = np.array([[0, 0, 1, 0, -1], [1, 1, 1, 200, 0], [1, 1, 1, 100, 1],
                         [1, 1, 1, 100, 1]])
    stats, line = traffic_statistics(counters, 10)
    assert stats["bytes_to_other_nodes_per_step"] == [0, 20, 10, 10]
    assert stats["bytes_to_other_nodes_per_step_by_node"] == [20, 20]
    assert "by node" in line
    assert traffic_statistics(counters[:, :3], 10) == ({}, None)
    one_node = counters.copy()
    one_node[1:, 4] = 0
    stats, line = traffic_statistics(one_node, 10)
    assert line is None and stats["bytes_to_other_nodes_per_step_by_node"] == [40]
