"""The continual-learning matrix: hand-computed metrics, JSON, the heatmap."""

from __future__ import annotations

import json
import os

import pytest

from lm.stats.continual import ContinualMatrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_KEYS = {"domains", "chunks", "R", "avg_loss", "forgetting", "bwt", "fwt",
                 "per_domain", "trained", "initial"}


def first_two_chunks() -> ContinualMatrix:
  """A pretrained at row 0; B appears before chunk 1; chunks 1 and 2 train B.

  row        A    B     trained
  initial   2.0  3.0    A        (B: loss_before = b_B = 3.0)
  c1        2.2  2.5    B
  c2        2.4  2.0    B
  """
  m = ContinualMatrix.start({"A": 2.0}, pretrained_domains=["A"])
  m.add_domain("B", initial_loss=3.0, loss_before=3.0)
  m.add_row("c1", ["B"], {"A": 2.2, "B": 2.5})
  m.add_row("c2", ["B"], {"A": 2.4, "B": 2.0})
  return m


def test_two_domains_three_chunks_by_hand():
  m = first_two_chunks()
  m.add_row("c3", ["A"], {"A": 2.1, "B": 2.3})  # row T = 3 trains A again
  got = m.metrics()
  # avg_loss = (2.1 + 2.3) / 2 = 2.2
  assert got["avg_loss"] == pytest.approx(2.2)
  # forgetting_A = 2.1 - min(2.0, 2.2, 2.4) = 0.1; forgetting_B = 2.3 - min(3.0, 2.5, 2.0) = 0.3; mean 0.2
  assert got["per_domain"]["A"]["forgetting"] == pytest.approx(0.1)
  assert got["per_domain"]["B"]["forgetting"] == pytest.approx(0.3)
  assert got["forgetting"] == pytest.approx(0.2)
  # bwt: A last trained in row 3 = T -> undefined; B last trained in row 2: 2.0 - 2.3 = -0.3 (chunk 3 hurt B)
  assert got["per_domain"]["A"]["bwt"] is None
  assert got["per_domain"]["B"]["bwt"] == pytest.approx(-0.3)
  assert got["bwt"] == pytest.approx(-0.3)
  # fwt: A is pretrained -> undefined; B first trained in row 1: b_B - R[0][B] = 3.0 - 3.0 = 0
  assert got["per_domain"]["A"]["fwt"] is None
  assert got["per_domain"]["B"]["fwt"] == pytest.approx(0.0)
  assert got["fwt"] == pytest.approx(0.0)
  b = got["per_domain"]["B"]
  assert (b["final"], b["best"], b["initial"]) == pytest.approx((2.3, 2.0, 3.0))


def late_domain() -> ContinualMatrix:
  """C appears before chunk 3 (b_C = 4.0, but chunks 1-2 lowered it to 3.5); chunk 3 trains C.

  row        A    B     C     trained
  initial   2.0  3.0   None   A
  c1        2.2  2.5   None   B
  c2        2.4  2.0   3.5    B
  c3        2.1  2.3   3.0    C
  """
  m = first_two_chunks()
  m.add_domain("C", initial_loss=4.0, loss_before=3.5)
  m.add_row("c3", ["C"], {"A": 2.1, "B": 2.3, "C": 3.0})
  return m


def test_domain_introduced_later_has_forward_transfer():
  m = late_domain()
  assert m.R[0][2] is None and m.R[1][2] is None and m.R[2][2] == 3.5
  got = m.metrics()
  # fwt_C = b_C - R[2][C] = 4.0 - 3.5 = 0.5; fwt_B = 0; mean 0.25
  assert got["per_domain"]["C"]["fwt"] == pytest.approx(0.5)
  assert got["fwt"] == pytest.approx(0.25)
  # forgetting: A 0.1, B 0.3, C = 3.0 - 3.5 = -0.5 (better than ever); mean = -0.1 / 3
  assert got["per_domain"]["C"]["forgetting"] == pytest.approx(-0.5)
  assert got["forgetting"] == pytest.approx(-0.1 / 3)
  # bwt: A last trained in row 0: 2.0 - 2.1 = -0.1; B row 2: 2.0 - 2.3 = -0.3; C trained in T -> undefined
  assert got["per_domain"]["A"]["bwt"] == pytest.approx(-0.1)
  assert got["per_domain"]["C"]["bwt"] is None
  assert got["bwt"] == pytest.approx(-0.2)
  assert got["avg_loss"] == pytest.approx((2.1 + 2.3 + 3.0) / 3)


def test_domain_seen_only_in_last_row_is_undefined_everywhere():
  m = late_domain()
  m.add_domain("D", initial_loss=5.0, loss_before=4.5)  # not trained yet, only in row T
  d = m.metrics()["per_domain"]["D"]
  assert d["forgetting"] is None and d["bwt"] is None and d["fwt"] is None
  assert d["final"] == 4.5 and d["best"] == 4.5 and d["initial"] == 5.0


def test_start_only_has_no_transfer():
  got = ContinualMatrix.start({"A": 2.0}, ["A"]).metrics()
  assert got["avg_loss"] == 2.0
  assert got["forgetting"] is None and got["bwt"] is None and got["fwt"] is None


def test_json_round_trip():
  m = late_domain()
  data = json.loads(json.dumps(m.to_json(), allow_nan=False))
  assert ContinualMatrix.from_json(data) == m
  assert data["R"][0][2] is None


def test_write_has_exactly_the_required_keys(tmp_path):
  m = late_domain()
  path = m.write(tmp_path / "run")
  assert path == os.path.join(tmp_path / "run", "continual.json")
  with open(path) as f:
    data = json.load(f)
  assert set(data) == REQUIRED_KEYS
  assert data["bwt"] == pytest.approx(-0.2)
  assert ContinualMatrix.from_json(data) == m
  assert sorted(os.listdir(tmp_path / "run")) == ["continual.json"]  # no temporary left behind


def test_heatmap_is_a_png_with_blank_cells(tmp_path):
  path = late_domain().heatmap(tmp_path / "plots" / "continual.png")
  with open(path, "rb") as f:
    assert f.read(len(PNG_MAGIC)) == PNG_MAGIC
  assert sorted(os.listdir(tmp_path / "plots")) == ["continual.png"]


def test_add_row_missing_domain_raises():
  m = first_two_chunks()
  with pytest.raises(ValueError, match="'B'"):
    m.add_row("c3", ["A"], {"A": 2.1})
  with pytest.raises(ValueError, match="add_domain"):
    m.add_row("c3", ["Z"], {"A": 2.1, "B": 2.0})
  assert len(m.R) == 3  # nothing half-added


def test_non_finite_loss_raises():
  m = first_two_chunks()
  with pytest.raises(ValueError, match="diverged"):
    m.add_row("c3", ["A"], {"A": float("nan"), "B": 2.0})
