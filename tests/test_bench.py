"""bench/: what the benches write down is what they measured (the tables are read by people
comparing runs taken on machines whose speed drifts)."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_pipeline_table_reports_repeats_and_the_cpu():
    import pipeline

    stages = {"decode": 1.0, "find": 5.0, "frame": 1.0, "classify": 3.0, "write": 0.0, "sum": 10.0}
    row = {"set": "photos as they are", "finder": "auto", "photos": 4, "faces": 4,
           "stages_ms_per_photo": stages, "stages_cpu_ms_per_photo": stages,
           "cpu_bound_photos_per_s": 200.0, "infer_photos_per_s": 150.0, "infer_wall_s": 2.0,
           "cascaded": 1}  # fmt: skip
    payload = {"sets": [row], "model": "m.onnx", "cpu": "Some CPU (2 CPUs; avx2)",
               "load_average_before": [1, 1, 1], "load_average_after": [1, 1, 1],
               "repeats": {"auto": [100.0, 90.0, 120.0], "mtcnn": [40.0, 42.0, 38.0]}}  # fmt: skip
    text = pipeline.markdown(payload)
    assert "| photos as they are | auto | 4 | 4 | 1.0 (1.0) |" in text
    assert "Some CPU (2 CPUs; avx2)" in text
    assert "3 runs a finder" in text
    assert "auto 100.0, 90.0, 120.0 (median 100.0); mtcnn 40.0, 42.0, 38.0 (median 40.0)" in text
    assert "1 of 4 photos as they are" in text
    # Without --repeats nothing about repeats is claimed.
    assert "runs a finder" not in pipeline.markdown({**payload, "repeats": None})


def test_pipeline_refuses_negative_repeats(capsys):
    import pipeline

    with pytest.raises(SystemExit):
        pipeline.parse_args(["--repeats", "-1"])
    assert "--repeats must be >= 0" in capsys.readouterr().err
