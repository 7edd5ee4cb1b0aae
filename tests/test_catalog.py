"""ternet.catalog: header-only model summaries and the CLI's default model choice."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import ternet.models
from ternet.catalog import FALLBACK_DEFAULT, default_model, metric, summarize


@pytest.mark.parametrize("metrics,top1", [
    ({"top1": 71.5}, 71.5),
    ({"top1": 0.715}, 71.5),                                       # fractions become percent
    ({"imagenet_val": {"top1": 70.1, "top5": 89.0}}, 70.1),
    ({"acc@1": 69.0, "acc@5": 88.0}, 69.0),
    ({"top_1_acc": 68.0}, 68.0),
    ({"cifar": {"top1": 99.0}, "imagenet": {"top1": 70.0}}, 70.0),  # ImageNet preferred
    ({"dev200_top1": 0.89, "dev200_fp32_top1": 0.91}, 89.0),      # not the float reference
    ({"fp32_top1": 0.91}, None),
    ({"images": 200}, None),
    (None, None),
])
def test_metric_layouts(metrics, top1):
    assert metric(metrics, "top1") == (pytest.approx(top1) if top1 is not None else None)


def fake_model(path, pointwise=("ternary",), classes=1000, metrics=None):
    """Only the header matters to the catalog: a graph with pointwise nodes, labels, metrics."""
    graph = [{"name": f"pw{i}", "op": "pointwise", "inputs": ["input"], "attrs": {"weight": w}}
             for i, w in enumerate(pointwise)]
    meta = {"format": "ternet", "ternet.format_version": "1", "ternet.arch": "fake",
            "ternet.graph": json.dumps(graph), "ternet.labels": json.dumps(["x"] * classes)}
    if metrics is not None:
        meta["ternet.metrics"] = json.dumps(metrics)
    save_file({"t": np.zeros(4, np.uint8)}, str(path), metadata=meta)


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ternet.models, "weights_dirs", lambda: [tmp_path])
    monkeypatch.delenv("TERNET_MODEL", raising=False)
    return tmp_path


def test_summary(weights):
    fake_model(weights / "m.safetensors", ("ternary", "int8"), 10, {"top1": 0.5, "top5": 0.9})
    s = summarize(weights / "m.safetensors")
    assert (s.name, s.arch, s.num_classes, s.pointwise) == ("m", "fake", 10, "mixed")
    assert s.top1 == pytest.approx(50.0) and s.top5 == pytest.approx(90.0) and s.size_bytes > 0


def test_default_is_most_accurate_ternary_imagenet_model(weights):
    fake_model(weights / "a_int8.safetensors", ("int8",), metrics={"top1": 75.0})
    fake_model(weights / "b_prom.safetensors", ("ternary",), metrics={"top1": 70.0})
    fake_model(weights / "c_prom.safetensors", ("ternary",), metrics={"top1": 72.0})
    fake_model(weights / "d_cifar.safetensors", ("ternary",), classes=10, metrics={"top1": 99.0})
    fake_model(weights / "e_hybrid.safetensors", ("ternary", "hybrid"), metrics={"top1": 74.0})
    (weights / "f_broken.safetensors").write_bytes(b"junk")      # skipped, not fatal
    assert default_model() == "c_prom"


def test_default_falls_back_and_env_overrides(weights, monkeypatch):
    assert default_model() == FALLBACK_DEFAULT
    fake_model(weights / "x.safetensors", ("int8",))
    assert default_model() == "x"                       # no ternary model: best ImageNet model
    fake_model(weights / "y.safetensors", ("ternary", "hybrid"), metrics={"top1": 10.0})
    assert default_model() == "y"                       # recorded accuracy beats none
    fake_model(weights / "z.safetensors", ("int8",), metrics={"top1": 80.0})
    assert default_model() == "z"                       # no all-ternary model: most accurate
    monkeypatch.setenv("TERNET_MODEL", "/some/where.safetensors")
    assert default_model() == "/some/where.safetensors"


def test_unusable_ternary_model_is_not_the_default(weights):
    """A ternary model far below its own FP32 reference must not become what `classify` uses."""
    fake_model(weights / "a_int8.safetensors", ("int8",), metrics={"dev200_top1": 0.89,
                                                                  "dev200_fp32_top1": 0.89})
    fake_model(weights / "b_prom.safetensors", ("ternary",), metrics={"dev200_top1": 0.06,
                                                                     "dev200_fp32_top1": 0.89})
    assert summarize(weights / "b_prom.safetensors").ref_top1 == pytest.approx(89.0)
    assert default_model() == "a_int8"
    fake_model(weights / "c_prom.safetensors", ("ternary",), metrics={"dev200_top1": 0.87,
                                                                     "dev200_fp32_top1": 0.89})
    assert default_model() == "c_prom"                  # within 3 points: the PROM default


def model_help(*argv) -> str:
    """What `ternet <argv> --help` prints about --model."""
    import contextlib
    import io

    from ternet.cli import build_parser
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    text = " ".join(out.getvalue().split())              # undo argparse's line wrapping
    return text[text.index("--model NAME|PATH, -m"):text.index(" -", text.index("(default:"))]


@pytest.mark.parametrize("command", ["classify", "warmup", "bench"])
def test_help_names_the_default_the_rule_picks(weights, monkeypatch, command):
    fake_model(weights / "a_int8.safetensors", ("int8",), metrics={"top1": 75.0})
    assert "else a_int8:" in model_help(command)         # no ternary model: the best one
    fake_model(weights / "b_prom.safetensors", ("ternary",), metrics={"top1": 72.0})
    assert "else b_prom:" in model_help(command) and default_model() == "b_prom"
    monkeypatch.setenv("TERNET_MODEL", "/some/100%/where.safetensors")
    assert "(default: $TERNET_MODEL, set to /some/100%/where.safetensors)" in model_help(command)


def test_a_missing_dependency_is_not_reported_as_no_models(weights, monkeypatch):
    """Skipping unreadable files must not turn an ImportError into an empty model list."""
    import ternet.catalog
    fake_model(weights / "m.safetensors")

    def no_safetensors(path):
        raise ModuleNotFoundError("No module named 'safetensors'")
    monkeypatch.setattr(ternet.catalog, "read_metadata", no_safetensors)
    with pytest.raises(ModuleNotFoundError):
        ternet.catalog.bundled_summaries()
