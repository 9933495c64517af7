"""The disk curve on a hand-built probe: interpolation, clamping, the coalescing gap, loading."""

import json

import pytest

from flashinfer_lite.loaders.disk_curve import DiskCurve, load_curve

K4, K16, K64 = 4096, 16384, 65536
# reads/s x size: 4 KiB at 5k/s and 50k/s, 64 KiB at 4k/s and ~15.3k/s (1 GB/s) at QD 1 / 32
POINTS = {(K4, 1): K4 * 5000.0, (K64, 1): K64 * 4000.0,
          (K4, 32): K4 * 50000.0, (K64, 32): 1e9,
          (K4, 128): K4 * 60000.0}  # deeper queues measured for small reads only


def test_bandwidth_at_points_between_and_outside():
    c = DiskCurve(POINTS)
    assert c.bandwidth(K4, 1) == pytest.approx(20.48e6)
    assert c.bandwidth(K64, 32) == pytest.approx(1e9)
    # 16 KiB is halfway between 4 and 64 KiB in log2(size)
    assert c.bandwidth(K16, 1) == pytest.approx((20.48e6 + 262.144e6) / 2)
    # depth 8 is 3/5 of the way from 1 to 32 in log2(depth)
    assert c.bandwidth(K4, 8) == pytest.approx(20.48e6 + 0.6 * (204.8e6 - 20.48e6))
    # 64 KiB was not measured past 32: flat there; 4 KiB goes on to 128
    assert c.bandwidth(K64, 128) == pytest.approx(1e9)
    assert c.bandwidth(K4, 64) == pytest.approx((204.8e6 + 245.76e6) / 2)
    # past the largest size and below the smallest: clamped
    assert c.bandwidth(1 << 20, 32) == pytest.approx(1e9)
    assert c.bandwidth(512, 1) == pytest.approx(20.48e6)


def test_coalesce_gap_is_per_read_time_times_ceiling():
    c = DiskCurve(POINTS)
    # QD 32: the cheapest read is 4 KiB at 1/50k s = 20 us; ceiling 1 GB/s -> 20 kB
    assert c.coalesce_gap(32) == 20000
    # QD 1: 4 KiB at 200 us (64 KiB takes 250); ceiling 262 MB/s -> ~52 kB
    assert c.coalesce_gap(1) == int(200e-6 * 262.144e6)
    assert c.coalesce_gap(1) > c.coalesce_gap(8) > c.coalesce_gap(32)


def test_load_curve_averages_runs_and_picks_the_engine(tmp_path):
    rows = [{"run": r, "engine": e, "size": s, "depth": d, "mb_s": bw / 1e6 * f}
            for r, f in ((1, 0.9), (2, 1.1))
            for (s, d), bw in POINTS.items()
            for e in ("fio", "python")]
    rows = [dict(row, mb_s=row["mb_s"] / 2) if row["engine"] == "python" else row
            for row in rows]
    path = tmp_path / "disk_probe.json"
    path.write_text(json.dumps({"rows": rows}))
    fio = load_curve(path)
    assert fio.bandwidth(K64, 32) == pytest.approx(1e9)
    assert load_curve(path, engine="python").bandwidth(K64, 32) == pytest.approx(0.5e9)
    assert load_curve(path, engine="none") is None
    assert load_curve(tmp_path / "missing.json") is None


def test_empty_curve_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        DiskCurve({})
