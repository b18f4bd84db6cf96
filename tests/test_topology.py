"""The kissing-spheres placement: geometry, the empty-vertex rule, recursion, docs."""
import itertools
import math
import pathlib
import re

import pytest

from mpitrain import topology as t

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "TOPOLOGY.md"


def test_vertices_form_an_icosahedron():
    # 12 distinct points, all at radius sqrt(1 + phi^2); 30 edges of length 2; 5 per vertex.
    # (float64 coordinates: a few ulps apart from the exact value; the next distance on an
    # icosahedron differs by a factor phi, so rel 1e-9 cannot confuse an edge with a non-edge)
    assert len(set(t.VERTICES)) == 12
    for v in t.VERTICES:
        assert math.isclose(math.hypot(*v), math.sqrt(1 + t.PHI ** 2), rel_tol=1e-12)
    edges = [(a, b) for a, b in itertools.combinations(range(12), 2)
             if math.isclose(math.dist(t.VERTICES[a], t.VERTICES[b]), 2.0, rel_tol=1e-9)]
    assert len(edges) == 30
    for v in range(12):
        nb = t.neighbours(v)
        assert len(nb) == 5 and v not in nb
        assert all((min(v, u), max(v, u)) in edges for u in nb)
    # The documented order: 0 a pole, 1-5 its ring in cyclic order, 11 the opposite pole.
    assert t.neighbours(0) == (1, 2, 3, 4, 5)
    assert t.neighbours(11) == (6, 7, 8, 9, 10)
    for k in range(5):
        assert 1 + (k + 1) % 5 in t.neighbours(1 + k)
        assert {1 + k, 1 + (k + 1) % 5} <= set(t.neighbours(6 + k))
    assert t.VERTICES[11] == tuple(-x for x in t.VERTICES[0])


@pytest.mark.parametrize("batch", [0, 1, 5, 12, 24, 32, 100, 300])
def test_every_window_assigned_exactly_once(batch):
    for n in range(1, 145):
        shares = t.assign_windows(n, batch)
        assert len(shares) == n
        flat = [j for share in shares for j in share]
        assert sorted(flat) == list(range(batch)), (n, batch)
        assert all(share == sorted(share) for share in shares)


def test_twelve_workers_take_one_group_each():
    assert t.assign_groups(12) == [[g] for g in range(12)]
    assert t.assign_windows(12, 32) == [list(range(g, 32, 12)) for g in range(12)]


def test_one_worker_takes_everything():
    assert t.assign_groups(1) == [list(range(12))]
    assert t.assign_windows(1, 7) == [list(range(7))]


def test_two_workers_by_hand():
    # Occupied {0, 1}. Nearest first: 2,3,4,5,6,10 touch an occupied vertex; 7,8,9,11 do not.
    # 2 -> 0 (tie 1:1, lowest), 3 -> 0, 4 -> 0, 5 -> 1 (0 holds 4, 1 holds 1), 6 -> 1, 10 -> 1;
    # 7: second ring {0,1,4,9,10}, 0 and 1 hold 4 each -> 0; 8: second ring holds only 0 -> 0;
    # 9: second ring {0,1,3,6,7} -> 1 (holds 4 < 6); 11: opposite 0, second ring 1..5 -> 1.
    assert t.group_owners(2) == (0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1)
    assert t.assign_groups(2) == [[0, 2, 3, 4, 7, 8], [1, 5, 6, 9, 10, 11]]


def test_eleven_workers_by_hand():
    # Only vertex 11 is empty; its neighbours 6..10 hold one group each -> lowest index, 6.
    assert t.group_owners(11) == tuple(range(11)) + (6,)
    assert t.assign_windows(11, 32)[6] == [6, 11, 18, 23, 30]


def test_owner_rule_holds_for_every_count():
    # Independent statement of the rule: an empty vertex's group goes to an occupied neighbour
    # if there is one, else to an occupied vertex at the smallest sphere distance.
    for n in range(1, 13):
        owners = t.group_owners(n)
        for g in range(12):
            if g < n:
                assert owners[g] == g
                continue
            d = {v: math.dist(t.VERTICES[g], t.VERTICES[v]) for v in range(n)}
            # equidistant owners are allowed: equal distances agree to float64 ulps
            assert math.isclose(d[owners[g]], min(d.values()), rel_tol=1e-9), (n, g)


def test_recursion_beyond_twelve():
    # 13 workers: worker 12 shares vertex 0 with worker 0. Group 0's windows at batch 32 are
    # 0, 12, 24 (t = 0, 1, 2): sub-groups 0, 1, 2 with sub-vertices {0, 1} occupied -> the
    # two-worker rule sends sub-group 2 to sub-vertex 0.
    shares = t.assign_windows(13, 32)
    assert shares[0] == [0, 24] and shares[12] == [12]
    assert all(shares[w] == list(range(w, 32, 12)) for w in range(1, 12))
    assert t.vertex_path(12, 13) == (0, 1) and t.vertex_path(5, 13) == (5, 0)
    # 24 workers: every vertex holds two workers; each group splits by the 2-worker rule.
    shares = t.assign_windows(24, 48)
    owners2 = t.group_owners(2)
    for w in range(24):
        v, sub = w % 12, w // 12
        expect = [v + 12 * tt for tt in range(4) if owners2[tt % 12] == sub]
        assert shares[w] == expect
    # 144 workers at batch 144*12 windows: each worker gets exactly 12 windows.
    assert {len(s) for s in t.assign_windows(144, 144 * 12)} == {12}
    # Beyond 144 the recursion goes one level deeper and still covers every window.
    assert sorted(sum(t.assign_windows(150, 2000), [])) == list(range(2000))
    assert t.vertex_path(149, 150) == (5, 0, 1)


def test_graph_is_symmetric_connected_and_icosahedral():
    for n in list(range(1, 30)) + [144, 150]:
        adj = t.graph_edges(n)
        assert len(adj) == n
        for a, nb in enumerate(adj):
            assert a not in nb
            assert all(a in adj[b] for b in nb)
        seen, todo = {0}, [0]
        while todo:
            for b in adj[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert len(seen) == n
    assert t.graph_edges(12) == [list(t.neighbours(v)) for v in range(12)]
    assert t.graph_edges(3) == [[1, 2], [0, 2], [0, 1]]


def test_deterministic_and_pure():
    a = [t.assign_windows(n, 37) for n in range(1, 40)]
    b = [t.assign_windows(n, 37) for n in range(1, 40)]
    assert a == b
    a[0][0].append(999)  # callers mutating a result must not change the next answer
    assert t.assign_windows(1, 37) == [list(range(37))]


def test_bad_arguments():
    with pytest.raises(ValueError):
        t.assign_windows(0, 32)
    with pytest.raises(ValueError):
        t.assign_windows(3, -1)
    with pytest.raises(ValueError):
        t.neighbours(12)


def test_table_mentions_every_worker():
    table = t.placement_table(11, 32)
    assert "batch 32" in table
    rows = [line for line in table.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == 11
    assert "[6, 11, 18, 23, 30]" in rows[6]


def test_docs_table_matches_the_function():
    text = DOC.read_text()
    begin = "<!-- generated: python -m mpitrain.topology -->\n"
    end = "<!-- end generated -->"
    assert begin in text and end in text
    generated = text.split(begin, 1)[1].split(end, 1)[0]
    assert generated.strip() == t.markdown_tables(12, 32).strip()


def test_windows_are_exactly_the_groups_windows():
    # Up to 12 workers a worker's windows are all windows of its groups (j % 12 in groups).
    for n in range(1, 13):
        for batch in (7, 24, 32, 100):
            for w, (groups, windows) in enumerate(zip(t.assign_groups(n),
                                                      t.assign_windows(n, batch))):
                assert windows == [j for j in range(batch) if j % 12 in groups], (n, w)
    # Beyond 12, the workers at a vertex split exactly that vertex's group.
    for n in (13, 30, 144):
        shares = t.assign_windows(n, 500)
        for v in range(12):
            members = range(v, n, 12)
            got = sorted(j for w in members for j in shares[w])
            assert got == list(range(v, 500, 12))
