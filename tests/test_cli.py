"""The `ternet` command line, run as a subprocess: exit codes, output contracts, errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crafted_images import all_nan_tiff, bomb_png, corrupt_exif_jpeg
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "demo" / "images" / "chelsea_cat.jpg"
CAT_CLASSES = range(281, 286)           # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian
REF = ["--kernels", "reference"]        # numpy reference runner: nothing to compile


def run(*args, env=None, timeout=900, **kw):
    e = {k: v for k, v in os.environ.items() if k not in ("TERNET_MODEL", "TERNET_DEBUG")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ternet", *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.safetensors")


@pytest.fixture
def photos(tmp_path):
    """A folder with good and bad images, in sorted order: a, b(corrupt), c(empty), d, notes."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / "a.png")
    (d / "b_corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (d / "c_empty.jpg").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(d / "sub" / "d.jpg")
    (d / "notes.txt").write_text("not an image, and not an image extension\n")
    return d


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]    # every stdout line is JSON


# ------------------------------------------------------------------ startup, usage (exit 2)

def test_import_and_help_compile_nothing():
    code = ("import sys, ternet, ternet.cli; ternet.cli.build_parser(); "
            "print(sorted(m for m in ('numba', 'PIL', 'safetensors') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_kernel_choices_are_the_request_vocabulary():
    """--kernels of every command that runs a model accepts exactly cpu.REQUESTS (what
    ternet.load and TERNET_KERNELS accept), and defaults to None: TERNET_KERNELS, else auto."""
    from ternet.cli import build_parser
    from ternet.kernels import cpu
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {name: p for name, p in sub.choices.items()
                if any(a.dest == "kernels" for a in p._actions)}
    assert set(commands) == {"classify", "warmup", "bench"}
    for p in commands.values():
        (kernels,) = [a for a in p._actions if a.dest == "kernels"]
        assert tuple(kernels.choices) == cpu.REQUESTS and kernels.default is None


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and "classify" in r.stdout and "info" in r.stdout
    r = run("--version")
    import ternet
    assert r.returncode == 0 and r.stdout.strip() == f"ternet {ternet.__version__}"


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["classify"], ["classify", "x", "--top-k", "0"],
                                  ["classify", "x", "--kernels", "gpu"],
                                  ["classify", "x", "--batch-size", "two"], ["info"],
                                  ["classify", "x", "--threads", "-1"]])
def test_usage_errors_exit_2(args):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "usage:" in r.stderr and r.stdout == ""


# ------------------------------------------------------------------ classify (exit 0)

def test_classify_table(tiny, photos):
    r = run("classify", photos / "a.png", "--model", tiny, *REF, "-k", "3")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                     # no progress: not a TTY
    lines = r.stdout.strip().splitlines()
    assert lines[0] == str(photos / "a.png") and len(lines) == 4
    assert lines[1].split()[0] == "1" and lines[1].split()[1].endswith("%")


def test_classify_json_schema(tiny, photos):
    r = run("classify", photos / "a.png", photos / "sub" / "d.jpg", "--model", tiny, *REF,
            "--json", "--top-k", "4")
    assert r.returncode == 0, r.stderr
    recs = json_lines(r.stdout)
    assert [x["path"] for x in recs] == [str(photos / "a.png"), str(photos / "sub" / "d.jpg")]
    for rec in recs:
        assert set(rec) == {"path", "predictions"}
        preds = rec["predictions"]
        assert [p["rank"] for p in preds] == [1, 2, 3, 4]
        assert all(set(p) == {"rank", "index", "label", "probability"} for p in preds)
        assert all(isinstance(p["index"], int) and 0 <= p["index"] < 10 for p in preds)
        assert all(p["label"] == f"class_{p['index']}" for p in preds)
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_batch_size_does_not_change_results(tiny, photos):
    args = ("classify", photos, "--model", tiny, *REF, "--json")
    one, many = run(*args, "--batch-size", "1"), run(*args, "--batch-size", "3")
    assert one.returncode == many.returncode == 1
    assert json_lines(one.stdout) == json_lines(many.stdout)


# ------------------------------------------------------------------ bad inputs (exit 1)

def test_bad_images_reported_others_classified(tiny, photos):
    missing, notes = photos / "missing.jpg", photos / "notes.txt"
    r = run("classify", photos, missing, notes, "--model", tiny, *REF, "--json", "-b", "2")
    assert r.returncode == 1
    recs = json_lines(r.stdout)
    # the directory is expanded recursively in sorted order; notes.txt is only there by name
    assert [Path(x["path"]).name for x in recs] == ["a.png", "b_corrupt.jpg", "c_empty.jpg",
                                                     "d.jpg", "missing.jpg", "notes.txt"]
    ok = {Path(x["path"]).name for x in recs if "predictions" in x}
    assert ok == {"a.png", "d.jpg"}
    errors = {Path(x["path"]).name: x["error"] for x in recs if "error" in x}
    assert errors["c_empty.jpg"] == "empty file"
    assert errors["missing.jpg"] == "no such file"
    assert errors["notes.txt"].startswith("not an image")
    err_lines = r.stderr.strip().splitlines()
    assert len(err_lines) == 4
    for line in err_lines:
        assert line.startswith("ternet: error: ") and "Traceback" not in r.stderr
    assert f"ternet: error: {photos / 'c_empty.jpg'}: empty file" in err_lines


def test_bad_image_table_mode(tiny, photos):
    r = run("classify", photos / "c_empty.jpg", photos / "a.png", "--model", tiny, *REF)
    assert r.returncode == 1
    assert r.stdout.startswith(str(photos / "a.png"))          # only results on stdout
    assert r.stderr.strip() == f"ternet: error: {photos / 'c_empty.jpg'}: empty file", r.stderr


def test_empty_directory(tiny, tmp_path):
    (tmp_path / "none").mkdir()
    r = run("classify", tmp_path / "none", "--model", tiny, *REF)
    assert r.returncode == 1 and "no image files found" in r.stderr


def test_directory_search_skips_formats_pillow_cannot_read(tiny, tmp_path):
    """A PDF (which Pillow writes but cannot read) or an HDF5 file in a photo folder is skipped
    like notes.txt; named explicitly, it is tried and reported."""
    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (40, 40), (90, 120, 30)).save(d / "a.png")
    Image.new("RGB", (40, 40), (90, 120, 30)).save(d / "manual.pdf")
    (d / "data.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (d / "notes.txt").write_text("not an image\n")
    r = run("classify", d, "--model", tiny, *REF, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [x["path"] for x in json_lines(r.stdout)] == [str(d / "a.png")]
    r = run("classify", d / "manual.pdf", "--model", tiny, *REF)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"ternet: error: {d / 'manual.pdf'}: not an image (unrecognised file "
                        "format)\n")


def test_decoding_warnings_never_reach_stderr(tiny, tmp_path):
    """Pillow's DecompressionBombWarning and 'Corrupt EXIF data' and numpy's 'All-NaN slice'
    each used to add lines of their own to stderr: now one `ternet: error:` line per bad
    image, nothing for an image whose only fault is its metadata."""
    bomb = bomb_png(tmp_path / "bomb.png")
    exif = corrupt_exif_jpeg(tmp_path / "exif.jpg")
    nan = all_nan_tiff(tmp_path / "nan.tif")
    r = run("classify", bomb, exif, nan, "--model", tiny, *REF, "--json")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"ternet: error: {bomb}: image is 9500 x 9500 pixels, more than the 89478485-pixel limit",
        f"ternet: error: {nan}: float image whose pixels are all NaN"]
    recs = json_lines(r.stdout)
    assert [x["path"] for x in recs] == [str(bomb), str(exif), str(nan)]
    assert "predictions" in recs[1] and "error" in recs[0] and "error" in recs[2]
    debug = run("classify", exif, "--model", tiny, *REF, env={"TERNET_DEBUG": "1"})
    assert debug.returncode == 0
    assert debug.stderr.startswith(f"ternet: {exif}: ignored UserWarning: Corrupt EXIF data")


# ------------------------------------------------------------------ bad models (exit 1)

def _one_clean_line(r):
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("ternet: error: ")


def test_missing_model(photos, tmp_path):
    r = run("classify", photos / "a.png", "--model", tmp_path / "nope.safetensors")
    _one_clean_line(r)
    assert "nope.safetensors" in r.stderr
    r = run("classify", photos / "a.png", "--model", "no_such_bundled_model")
    _one_clean_line(r)
    assert "no_such_bundled_model" in r.stderr


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
                                     os.urandom(5000)])
def test_malformed_model(photos, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    r = run("classify", photos / "a.png", "--model", bad)
    _one_clean_line(r)
    assert str(bad) in r.stderr
    _one_clean_line(run("info", bad))


def test_not_a_ternet_file(photos, tmp_path):
    from safetensors.numpy import save_file
    p = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p), metadata={"format": "pt"})
    r = run("classify", photos / "a.png", "--model", p)
    _one_clean_line(r)
    assert "not a ternet model file" in r.stderr


def test_debug_shows_traceback(photos, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    r = run("classify", photos / "a.png", "--model", bad, env={"TERNET_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr


# ------------------------------------------------------------------ interrupt (exit 130)

def test_ctrl_c_exits_130(tiny, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    src = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src)
    for i in range(5000):       # enough work (seconds) that the run cannot end before the signal
        os.symlink(src, d / f"{i:05d}.png")     # lands, even with this process descheduled
    e = {k: v for k, v in os.environ.items() if k != "TERNET_MODEL"}
    p = subprocess.Popen([sys.executable, "-m", "ternet", "classify", str(d), "--model", str(tiny),
                          *REF, "--json", "-b", "1"], cwd=ROOT, env=e, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()                      # it is classifying
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


# ------------------------------------------------------------------ other commands

def test_info(tiny):
    r = run("info", tiny)
    assert r.returncode == 0, r.stderr
    for text in ("stem", "MACs per image", "fp16", "Horowitz", "assumptions"):
        assert text in r.stdout
    d = json.loads(run("info", tiny, "--json").stdout)
    assert d["totals"]["macs"] == sum(l["macs"] for l in d["layers"])
    assert all(l["mults"] == 0 for l in d["layers"] if l["weight"] == "ternary")
    assert d["energy"]["ratio_fp16_int8_accumulate"] > 1 and d["assumptions"]


def test_info_missing_model(tmp_path):
    _one_clean_line(run("info", tmp_path / "nope.safetensors"))


def test_models_lists_bundled():
    r = run("models")
    assert r.returncode == 0, r.stderr
    for line in run("models", "--json").stdout.splitlines():
        rec = json.loads(line)
        assert {"name", "path", "top1", "size_bytes", "pointwise"} <= set(rec)


def test_bench_reference(tiny):
    r = run("bench", "--model", tiny, *REF, "--rounds", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["batch"] == 1 and d["median_ms"] > 0 and d["kernels"] == "reference"


@pytest.mark.parametrize("env, threads", [({}, 1), ({"TERNET_NUM_THREADS": "2"}, 2)])
def test_bench_reports_the_thread_count_in_use(tiny, env, threads):
    r = run("bench", "--model", tiny, *REF, "--rounds", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert f" threads={threads}: median " in r.stdout
    d = json.loads(run("bench", "--model", tiny, *REF, "--rounds", "2", "--json", env=env).stdout)
    assert d["threads"] == threads


def test_bench_layer_table_columns_line_up():
    from ternet.bench import format_report
    layers = [("stem", "conv2d", 1234.5),
              ("blocks.12.project+blocks.12.add", "pointwise+add", 7.5),   # a fused, long name
              ("fc", "linear", 98765.0)]
    r = dict(kernels="vnni", batch=1, threads=1, median_ms=1.0, min_ms=0.9, compile_s=0.1,
             loadavg=0.5, layers=layers)
    table = format_report(r).split("\n")[2:]            # after the summary and per-op lines
    assert table[0].split() == ["layer", "op", "us"] and len(table) == 1 + len(layers)
    op_col = table[1].index("conv2d")
    assert all(row[op_col - 2:op_col] == "  " for row in table)   # names never run into ops
    assert [row.split()[1] for row in table[1:]] == ["conv2d", "pointwise+add", "linear"]
    assert len({len(row) for row in table}) == 1                  # times right-aligned
    assert [float(row.split()[2]) for row in table[1:]] == [1234.5, 7.5, 98765.0]


def test_bench_reports_each_layers_kernel(tiny):
    """bench's per-layer table has a kernel column: what each built layer runs on this CPU (the
    pointwise family the table picks, the depthwise layout, im2col + GEMM for the stem)."""
    import ternet
    from ternet.bench import bench_model, format_report
    from ternet.kernels import cpu
    r = bench_model(ternet.load(tiny, threads=1), batch=2, rounds=2)
    kernels = dict(zip((n for n, _, _ in r["layers"]), r["layer_kernels"]))
    table = format_report(r).split("\n")[2:]
    assert table[0].split() == ["layer", "op", "kernel", "us"] and len(table) == 1 + len(kernels)
    assert [row.split()[2] for row in table[1:]] == list(kernels.values())
    family = cpu.pointwise_kernel(ternary=True)
    ops = dict((n, op) for n, op, _ in r["layers"])
    for name, k in kernels.items():
        if ops[name] == "conv2d":
            assert k.startswith("im2col+")
        elif ops[name] == "depthwise":
            assert k.split("+")[0] in {"vnni", "avx2", "portable"}
        elif ops[name].startswith("pointwise") and family in ("vnni", "avx2"):
            assert k.startswith(family)
        elif ops[name].startswith("pointwise") and family == "amx":
            assert k in ("amx", "vnni")
    assert cpu.cpu_class() in r["cpu"] and f"on {r['cpu']}" in format_report(r).split("\n")[0]


def test_warmup_reference(tiny):
    r = run("warmup", "--model", tiny, *REF)
    assert r.returncode == 0 and "kernels ready" in r.stdout


# ------------------------------------------------------------------ the real thing

def _default_weights():
    from ternet.catalog import bundled_summaries
    return [s for s in bundled_summaries() if s.is_imagenet]


@pytest.mark.skipif(not _default_weights(), reason="no bundled ImageNet weights in weights/")
def test_demo_cat_is_a_cat():
    """With the default model (catalog.default_model), the demo cat is a cat class."""
    r = run("classify", CAT, "--json")
    assert r.returncode == 0, r.stderr
    (rec,) = json_lines(r.stdout)
    assert rec["predictions"][0]["index"] in CAT_CLASSES, rec


def test_cold_cache_marker(tmp_path, monkeypatch):
    from ternet import jitcache
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    assert not jitcache.is_warm("auto", "conv2d,linear")
    jitcache.mark_warm("auto", "conv2d,linear")
    assert jitcache.is_warm("auto", "conv2d,linear")
    assert jitcache.marker("auto", "conv2d,linear").parent == tmp_path / "cache"
    assert not jitcache.is_warm("plain", "conv2d,linear")       # other kernels: other marker
    assert not jitcache.is_warm("auto", "conv2d,depthwise,linear")
    assert jitcache.is_warm("reference", "anything")            # numpy only: never cold


# ------------------------------------------------------------------ hostile strings (issue 16)

# Labels, arch, metrics keys and file names are untrusted: each of these would clear the
# screen, set the window title, forge a result line or reorder text if printed raw.
HOSTILE = ["\x1b[2J\x1b[H", "\x1b]0;owned\x07", "\n  1  99.99%      0  forged", "\r\x1b[K",
           "\x9b31m", "\u202eevil", "\u2028", "\x00", "\x7f"]
HOSTILE_ARCH = "tiny" + "".join(HOSTILE)
HOSTILE_LABELS = [f"class_{i}{HOSTILE[i % len(HOSTILE)]}" for i in range(10)]
HOSTILE_METRIC = "\x1b[2J\ndev_top1"


def raw_controls(text: str) -> list[str]:
    """Terminal-active characters in command output, other than the newlines it is made of."""
    from test_text import terminal_active
    return sorted({c for c in text if c != "\n" and terminal_active(c)})


def lines_of(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")        # not splitlines: it also splits at \x1c, \u2028


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from ternet.format import write_model
    from tiny_model import tiny_graph
    graph, tensors, input_spec, pre = tiny_graph(seed=3)
    path = tmp_path_factory.mktemp("hostile") / "evil\x1b]0;owned\x07\n.safetensors"
    write_model(path, arch=HOSTILE_ARCH, graph=graph, tensors=tensors, input_spec=input_spec,
                preprocess=pre, labels=HOSTILE_LABELS, provenance={"producer": HOSTILE[0]},
                metrics={HOSTILE_METRIC: 0.5})
    return path


@pytest.fixture
def hostile_image(photos):
    path = photos / "cat\x1b[2J\n.png"
    path.write_bytes((photos / "a.png").read_bytes())
    return path


def test_hostile_strings_are_escaped_in_classify(hostile, hostile_image, photos):
    r = run("classify", hostile_image, photos / "c_empty.jpg", "--model", hostile, *REF, "-k", "10")
    assert r.returncode == 1                                  # the empty image failed
    assert raw_controls(r.stdout) == [] and raw_controls(r.stderr) == []
    assert len(lines_of(r.stdout)) == 1 + 10          # the path, 10 ranks: no forged line
    assert lines_of(r.stdout)[0] == os.path.join(hostile_image.parent, "cat\\x1b[2J\\x0a.png")
    assert "class_1\\x1b]0;owned\\x07" in r.stdout           # labels shown, escaped
    assert len(lines_of(r.stderr)) == 1 and r.stderr.startswith("ternet: error: ")


def test_hostile_labels_round_trip_in_json(hostile, hostile_image):
    r = run("classify", hostile_image, "--model", hostile, *REF, "-k", "10", "--json")
    assert r.returncode == 0, r.stderr
    assert raw_controls(r.stdout) == []                       # json.dumps escapes them
    (rec,) = json_lines(r.stdout)
    assert rec["path"] == str(hostile_image)
    assert sorted(p["label"] for p in rec["predictions"]) == sorted(HOSTILE_LABELS)


def test_hostile_strings_are_escaped_in_info(hostile):
    r = run("info", hostile)
    assert r.returncode == 0, r.stderr
    assert raw_controls(r.stdout) == [] and r.stderr == ""
    assert lines_of(r.stdout)[1].startswith("arch:  tiny\\x1b[2J\\x1b[H\\x1b]0;owned\\x07\\x0a")
    d = json.loads(run("info", hostile, "--json").stdout)
    assert d["arch"] == HOSTILE_ARCH and d["path"] == str(hostile)


def test_hostile_strings_are_escaped_in_warmup_and_errors(hostile, photos, tmp_path):
    r = run("warmup", "--model", hostile, *REF)
    assert r.returncode == 0, r.stderr
    assert raw_controls(r.stdout) == [] and "evil\\x1b]0;owned" in r.stdout
    r = run("models", photos / "a\x1b[2J.png")                 # usage error echoing an argument
    assert r.returncode == 2 and raw_controls(r.stderr) == []
    assert "unrecognized arguments: " in r.stderr and "a\\x1b[2J.png" in r.stderr
    missing = tmp_path / "no\x1b[2Jsuch\n.safetensors"
    r = run("classify", photos / "a.png", "--model", missing)
    _one_clean_line(r)
    assert raw_controls(r.stderr) == [] and "no\\x1b[2Jsuch\\x0a.safetensors" in r.stderr


def test_hostile_strings_are_escaped_in_models(hostile, tmp_path, monkeypatch, capsys):
    import shutil

    import ternet.models
    from ternet.cli import main
    shutil.copy(hostile, tmp_path / hostile.name)
    monkeypatch.setattr(ternet.models, "weights_dirs", lambda: [tmp_path])
    assert main(["models"]) == 0
    out, err = capsys.readouterr()
    assert raw_controls(out) == [] and raw_controls(err) == []
    row = lines_of(out)[2]                                    # header, dashes, the model
    assert row.startswith("evil\\x1b]0;owned\\x07\\x0a") and "\\x1b[2J\\x0adev_top1" in row
    assert main(["models", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["arch"] == HOSTILE_ARCH and rec["metric_key"] == HOSTILE_METRIC
