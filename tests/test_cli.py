"""The CLI end to end through Typer's CliRunner, and the pipeline runner."""

from __future__ import annotations

import collections
import csv
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fercache import cli
from fercache.manifests import read_manifest
from fercache.store import open_store

runner = CliRunner()


def invoke(*args):
    """Run the CLI as `main()` would: FercacheError -> exit 2 with `error:`."""
    try:
        return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)
    except cli.FercacheError as e:  # main() does this for the console script
        class R:
            exit_code, output = 2, f"error: {e}"
        return R()


def test_manifest_build_extract_info_export(tiny_dataset, tiny_encoder_spec, tmp_path):
    m = tmp_path / "m.csv"
    r = invoke("manifest", "build", tiny_dataset / "faces", "--format", "imagefolder", "-o", m, "--data-root",
               tiny_dataset)
    assert r.exit_code == 0 and "72 rows" in r.output
    r = invoke("manifest", "check", m, "--data-root", tiny_dataset, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["splits"] == {"test": 24, "train": 24, "val": 24}
    assert json.loads(r.output)["leaking_units"] == 0
    r = invoke("manifest", "check", m, "--data-root", tiny_dataset)
    assert r.exit_code == 0 and "72 rows" in r.output and "no val/test image repeats" in r.output
    assert [line.split() for line in r.output.splitlines() if line.strip().startswith("total")][0] == ["total", "24",
                                                                                                       "24", "24", "72"]
    s = tmp_path / "s.zarr"
    r = invoke("extract", m, "--encoder", tiny_encoder_spec, "--out", s, "--data-root", tiny_dataset, "--workers", "0")
    assert r.exit_code == 0 and "72 ok, 0 failed" in r.output, r.output
    assert open_store(s).complete
    r = invoke("info", s)
    assert r.exit_code == 0 and "complete   True" in r.output and "embedding[32]" in r.output
    r = invoke("info", s, "--json")
    assert json.loads(r.output)["rows"] == 72
    r = invoke("export", s, "--to", tmp_path / "s.h5")
    assert r.exit_code == 0 and (tmp_path / "s.h5").is_file()


def test_manifest_formats_lists_each_layout_with_the_options_it_takes(tmp_path):
    """The --option keys were found only by reading the source (or by a wrong one's error)."""
    from fercache.adapters import ADAPTERS

    r = invoke("manifest", "formats")
    lines = r.output.splitlines()
    assert r.exit_code == 0 and len(lines) == 2 * len(ADAPTERS)
    at = lines.index(next(line for line in lines if line.startswith("ckplus_release ")))
    assert lines[at + 1].split() == ["--option", "images=cohn-kanade-images", "emotion=Emotion", "facs=FACS",
                                     "landmarks=Landmarks", "peak_frames=3", "neutral_frames=0", "unlabelled=false",
                                     "face_margin=0.15", "test_fraction=0.2"]
    assert "--option csv_file=fer2013.csv images=(auto)" in r.output and "--option (none)" in r.output  # jaffe
    r = invoke("manifest", "formats", "ckplus_release")
    assert r.exit_code == 0 and r.output.startswith("CK+ as released: ") and "(the 8-class protocol)" in r.output
    assert r.output.splitlines()[-1].startswith("--option images=cohn-kanade-images ")
    r = invoke("manifest", "formats", "ckplus_relase")
    assert r.exit_code == 2 and "did you mean 'ckplus_release'?" in r.output


def test_errors_exit_2_with_message(tmp_path, monkeypatch, capsys):

    monkeypatch.setattr("sys.argv", ["fercache", "info", str(tmp_path / "missing.zarr")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "error: no fercache store" in capsys.readouterr().err
    # What the OS refuses (here: a read-only folder, as root cannot make one: the write is made to fail) is its
    # own message, not a traceback; -v keeps the traceback
    def refused(path, mode):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("fercache.manifests._open_text", refused)
    args = ["fercache", "manifest", "build", "-f", "imagefolder", str(tmp_path / "data"), "-o",
            str(tmp_path / "ro" / "m.csv")]
    (tmp_path / "data" / "train" / "happy").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "happy" / "x.png")
    monkeypatch.setattr("sys.argv", args)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert (e.value.code == 2 and err == "error: [Errno 13] Permission denied: "
                                         f"'{tmp_path / 'ro' / 'm.csv.tmp'}' (-v shows where)\n")
    monkeypatch.setattr("sys.argv", args[:1] + ["-v"] + args[1:])
    with pytest.raises(PermissionError):
        cli.main()


def test_pipeline_runs_steps(tiny_dataset, tiny_encoder_spec, tmp_path, monkeypatch):
    p = tmp_path / "p.toml"
    p.write_text(f"""
[vars]
data = "{tiny_dataset}"
out = "{tmp_path}/out"
size = 32
[[step]]
run = "manifest"
format = "imagefolder"
src = "{{data}}/faces"
data_root = "{{data}}"
out = "{{out}}/m.csv"
[[step]]
run = "extract"
manifest = "{{out}}/m.csv"
encoder = "{tiny_encoder_spec}"
image_size = "{{size}}"
root = "{{data}}"
out = "{{out}}/s.zarr"
workers = 0
progress = false
[[step]]
run = "train"
store = "{{out}}/s.zarr"
head = "linear"
out = "{{out}}/runs"
recipe = {{ epochs = 2 }}
[[step]]
run = "audit"
manifest = "{{out}}/m.csv"
data_root = "{{data}}"
""")
    r = invoke("run", p)
    assert r.exit_code == 0, r.output
    assert re.search(r"^\[2\] extract \(\d+\.\d s\): ", r.output, re.M) and "72 ok" in r.output  # each step timed
    assert re.search(r"\n\[4\] audit \(\d+\.\d s\):\nsubjects in more than one split: ", r.output)  # a report of
    assert re.search(rf"\n{re.escape(str(p))}: 4 step\(s\) in \d+(\.\d)? s\n", r.output)  # lines on its own
    assert (tmp_path / "out/runs/s-linear/seed0/head.pt").is_file()  # `out` as in every step and the CLI
    head = tmp_path / "out/runs/s-linear/seed0/head.pt"
    stamp = head.stat().st_mtime_ns
    r = invoke("run", p)  # run again: the store is complete, the run finished with the same settings and code
    assert "already complete" in r.output and "; reused)" in r.output and head.stat().st_mtime_ns == stamp
    r = invoke("run", p, "--retrain")
    assert r.exit_code == 0 and "reused" not in r.output and head.stat().st_mtime_ns != stamp
    monkeypatch.setenv("FERCACHE_SIZE", "48")  # env overrides a variable, keeping its type
    r = invoke("run", p)
    assert r.exit_code == 2 and "step 2 (extract)" in r.output and "--overwrite" in r.output


def test_a_pipeline_evaluate_step_draws_the_surest_mistakes_as_the_command_does(tiny_store, tmp_path, monkeypatch):
    """`errors` was the command's alone: a pipeline could not draw errors.png."""
    monkeypatch.delenv("FERCACHE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the images are found under the data root the store records

    def pipeline(errors: str):
        p = tmp_path / "p.toml"
        p.write_text(f'[[step]]\nrun = "train"\nstore = "{tiny_store}"\nhead = "linear"\nout = "{tmp_path}/runs"\n'
                     f'recipe = {{ epochs = 2 }}\n[[step]]\nrun = "evaluate"\nruns = ["{tmp_path}/runs/faces-linear"]\n'
                     f'errors = {errors}\n')
        return invoke("run", p)

    for bad, said in (("-1", "-1"), ('"4"', "'4'"), ("true", "True")):
        r = pipeline(bad)
        assert r.exit_code == 2 and f"step 2 (evaluate): errors={said}: how many of the surest" in r.output, r.output
        assert not (tmp_path / "runs").exists()  # refused before the first step
    r = pipeline("4")
    png = tmp_path / "runs/faces-linear/seed0/eval-faces-test/errors.png"
    assert r.exit_code == 0 and f"  surest mistakes -> {png}\n" in r.output, r.output
    assert png.stat().st_size > 5000


def test_pipeline_unknown_step(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[[step]]\nrun = "teleport"\n')
    r = invoke("run", p)
    assert r.exit_code == 2 and "teleport" in r.output and "manifest" in r.output


def test_the_data_folder_is_data_root_in_every_step_and_the_old_root_still_reads(tmp_path):
    """Manifest and audit steps said `data_root` (as `--data-root`), extract and near_dups `root`: one name now."""
    from fercache.pipeline import describe_step, load_pipeline

    assert all("data_root" in describe_step(k)["optional"] and "root" not in describe_step(k)["optional"]
               for k in ("manifest", "audit", "extract", "near_dups"))
    head = '[[step]]\nrun = "extract"\nmanifest = "m.csv"\nencoder = "null:"\nout = "s.zarr"\n'
    for key in ("data_root", "root"):
        (tmp_path / "p.toml").write_text(head + f'{key} = "/data"\n')
        assert load_pipeline(tmp_path / "p.toml")[0]["data_root"] == "/data"
    (tmp_path / "p.toml").write_text(head + 'root = "/a"\ndata_root = "/b"\n')
    r = invoke("run", tmp_path / "p.toml", "--check")
    assert r.exit_code == 2 and "both 'root' and 'data_root', which are one key" in r.output
    (tmp_path / "p.toml").write_text('[[step]]\nrun = "runs"\nroot = "out"\n')  # the ledger's own `root`: untouched
    assert load_pipeline(tmp_path / "p.toml")[0]["root"] == "out"


def test_a_pipeline_file_that_is_not_toml_text_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "p.toml").write_bytes(b"\xff\xfe[[step]]")  # UTF-16, or any binary file given by mistake
    r = invoke("run", tmp_path / "p.toml", "--check")
    assert r.exit_code == 2 and "p.toml is not a TOML text file ('utf-8' codec can't decode byte 0xff" in r.output
    (tmp_path / "p.toml").write_text('[x]\nrun = "extract"\nmanifest = \n')
    r = invoke("run", tmp_path / "p.toml", "--check")
    assert r.exit_code == 2 and "p.toml: Invalid value (at line 3, column 12)" in r.output


def test_only_a_step_that_does_not_exist_is_an_error_not_a_run_of_nothing(tmp_path, monkeypatch):
    from pathlib import Path

    quickstart = Path(__file__).parents[1] / "pipelines" / "quickstart.toml"
    for args in (["--check"], []):  # it printed "0 step(s)" and exited 0
        r = invoke("run", quickstart, "--only", "extract-fer2014", *args)
        assert r.exit_code == 2 and "step name or kind 'extract-fer2014' (did you mean 'extract-fer2013'?)" in r.output
    for dataset in ("fer2013", "ckplus48"):
        (tmp_path / "data" / dataset).mkdir(parents=True)
    monkeypatch.setenv("FERCACHE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FERCACHE_OUT", str(tmp_path / "out"))
    r = invoke("run", quickstart, "--only", "manifest", "--only", "ledger", "--check")  # a kind, and a name
    assert r.exit_code == 0 and "3 step(s) checked" in r.output, r.output
    # extract alone reads the manifests that the steps left out would have written
    r = invoke("run", quickstart, "--only", "extract", "--check")
    assert r.exit_code == 2 and (f"step 5 (extract-fer2013): manifest {tmp_path}/out/manifests/fer2013.csv.gz does not "
                                 "exist, and no earlier step writes it") in " ".join(r.output.split()), r.output
    r = invoke("run", quickstart, "--only", "extrct", "--check")  # kinds are suggested too, and listed
    assert r.exit_code == 2 and "'extrct' (did you mean 'extract'?)" in r.output and " near_dups, " in r.output
    r = invoke("run", quickstart.with_name("quickstrat.toml"), "--check")
    assert r.exit_code == 2 and f"quickstrat.toml does not exist (did you mean '{quickstart}'?)" in r.output


def test_a_pipeline_file_with_misnamed_tables_or_a_folder_is_refused(tmp_path):
    """[[steps]] said "no [[step]] tables"; a variable above [vars] was ignored without a word (its steps used
    the [vars] value, or none); a folder passed as the file 'did not exist'."""
    cases = {'[[steps]]\nrun = "extract"\n': "unknown top-level key 'steps' (did you mean 'step'?)",
             'out = "o"\n[vars]\ndata = "d"\n[[step]]\nrun = "extract"\n':
             "unknown top-level key 'out' (a variable? put it under [vars])",
             'step = "extract"\n': "'step' must be [[step]] tables, one per step",
             'vars = 3\n[[step]]\nrun = "extract"\n': "'vars' must be a table"}
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"p{i}.toml").write_text(text)
        r = invoke("run", tmp_path / f"p{i}.toml", "--check")
        assert r.exit_code == 2 and f"p{i}.toml: {message}" in " ".join(r.output.split()), r.output
    r = invoke("run", tmp_path, "--check")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{tmp_path} is a folder; pass a pipeline file (here: p0.toml, p1.toml, p2.toml, " \
        "p3.toml)" in said, r.output


def test_a_brace_in_a_pipeline_value_is_a_variable_an_escaped_brace_or_an_error(tmp_path):
    """`{}`, `{0}`, a lone brace or `{data.x}` in a value were a Python traceback (str.format's IndexError,
    ValueError, AttributeError); `{data[0]}` silently took the variable's first character."""
    step = '[vars]\ndata = "d"\n[[step]]\nrun = "manifest"\nformat = "ckplus"\nsrc = "{data}/ck"\nout = "%s"\n'
    said = "is not a variable; variables are written {name} ([vars] here: data), a literal brace {{ or }}"
    cases = {"{}/m.csv": "{} in '{}/m.csv' " + said, "{0}/m.csv": "{0} in '{0}/m.csv' " + said,
             "{data[0]}/m.csv": "{data[0]} in '{data[0]}/m.csv' " + said,
             "{data.x}/m.csv": "{data.x} in '{data.x}/m.csv' " + said,
             "a}b/m.csv": "'a}b/m.csv': Single '}' encountered in format string; variables are written",
             "{dta}/m.csv": "unknown variable {dta} in '{dta}/m.csv'; define it under [vars] (did you mean 'data'?)"}
    for i, (value, message) in enumerate(cases.items()):
        (tmp_path / f"p{i}.toml").write_text(step % value)
        r = invoke("run", tmp_path / f"p{i}.toml", "--check")
        assert r.exit_code == 2 and f"p{i}.toml: step 1 (manifest): {message}" in " ".join(r.output.split()), r.output
    from fercache.pipeline import load_pipeline

    (tmp_path / "ok.toml").write_text(step % "{{{data}}}/m.csv")
    (loaded,) = load_pipeline(tmp_path / "ok.toml")
    assert loaded["out"] == "{d}/m.csv" and loaded["src"] == "d/ck"


def test_every_shipped_pipeline_passes_the_pre_flight_check(monkeypatch, tmp_path):
    """Typos in pipelines/ (a step argument, a head, an hp/recipe value, a dataset format) fail here, not hours
    into a GPU run. The GPU pipelines name `device = "cuda"`: checked as cpu on a machine without one."""
    from pathlib import Path

    from fercache import devices
    from fercache.pipeline import check_pipeline, load_pipeline

    real = devices.torch_device
    monkeypatch.setattr(devices, "torch_device", lambda d: real("cpu" if str(d).startswith("cuda") else d))
    repo = Path(__file__).parents[1]
    files = sorted((repo / "pipelines").glob("*.toml"))
    assert {f.name for f in files} >= {"quickstart.toml", "dfew_temporal.toml", "clip_cross.toml"}
    monkeypatch.chdir(repo)  # their paths are relative to the repository root (data_manifests/)
    from fercache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^step 1 \(manifest-fold1\): src /data/DFEW does not exist, and no earlier "
                                          r"step writes it \(from \[vars\] dfew: set FERCACHE_DFEW=PATH, or edit the "
                                          r"file\)$"):  # the DFEW folder is the user's to give: the message says how
        check_pipeline(repo / "pipelines" / "dfew_temporal.toml")
    for dataset in ("fer2013", "ckplus48"):  # the datasets' folders, wherever they are (../shared/data is not needed)
        (tmp_path / dataset).mkdir()
    monkeypatch.setenv("FERCACHE_DATA", str(tmp_path))
    for dataset in ("dfew", "rafdb", "ferplus", "affectnet", "sfew", "mma", "affwild2", "ferv39k", "mafw"):
        monkeypatch.setenv(f"FERCACHE_{dataset.upper()}", str(tmp_path))  # the papers' datasets: the user's to give
    for f in files:
        assert check_pipeline(f) == len(load_pipeline(f)) > 3, f.name


def test_every_argument_a_step_offers_reaches_the_library(monkeypatch):
    """Each name the pre-flight check accepts for a step is one the step can pass on: none that the step fills in
    itself (train's out_dir and seed), which would pass the check and fail only when the step is reached."""
    import inspect

    from fercache import pipeline

    class Reached(Exception):
        pass

    forwarding = {kind: step for kind, step in pipeline.STEPS.items() if step.forwards}
    takes = {kind: step.takes() for kind, step in forwarding.items()}  # before any target is replaced
    for kind, step in forwarding.items():
        module, fn = step.forwards
        real = step.target

        def recorder(*a, _real=real, **k):
            raise Reached(inspect.signature(_real).bind(*a, **k).arguments)

        monkeypatch.setattr(f"fercache.{module}.{fn}", recorder)
        own = {p.name: ["x"] for p in step.params() if p.default is p.empty}
        for name in sorted(takes[kind] - set(own)):
            with pytest.raises(Reached) as e:  # not TypeError: got multiple values for argument
                step.run(**own, **{name: [7]})
            bound = e.value.args[0]
            bound |= bound.pop("fit_kw", {})  # sweep's **fit_kw, handed on to fit
            if name not in {p.name for p in step.params()}:  # not one the step uses itself: it arrived
                assert [7] in bound.values() or bound["seed"] == 7, (kind, name)
    assert "out_dir" not in takes["train"] and "out" in takes["train"]
    assert {"manifest", "views"} <= takes["sweep"] and "fit_kw" not in takes["sweep"]


def _pipeline(tmp_path, tiny_dataset, third: str) -> Path:
    p = tmp_path / "p.toml"
    p.write_text(f"""
[[step]]
run = "manifest"
format = "imagefolder"
src = "{tiny_dataset}/faces"
out = "{tmp_path}/m.csv"
[[step]]
run = "runs"
root = "{tmp_path}"
[[step]]
{third}
""")
    return p


def test_a_pipeline_is_checked_whole_before_its_first_step_runs(tiny_dataset, tmp_path):
    cases = [
        ('run = "cross"\nstores = ["s.zarr"]\nheads = ["linear"]\nout = "x"\nmetrics = ["ece"]',
         "step 3 (cross): cross takes no argument 'metrics' (did you mean 'metric'?)"),
        ('run = "cross"\nstores = ["s.zarr"]\nheads = ["linaer"]\nout = "x"', "unknown head 'linaer' "
                                                                              "(did you mean 'linear'?)"),
        ('run = "cross"\nstores = ["s.zarr"]\nheads = ["linear"]\nout = "x"\nrecipe = { mask = { epochs = 3 } }',
         "recipe has entries for 'mask', which is none of the heads (linear)"),
        ('run = "cross"\nstores = ["s.zarr"]\nheads = ["mask"]\nout = "x"\nrecipe = { mask = { scheduler = "cos" } }',
         "recipe scheduler='cos'"),
        ('run = "train"\nstore = "s.zarr"\nhead = "mask"\nhp = { use_sigmoid = "no" }', "use_sigmoid='no'; "
                                                                                        "give true or false"),
        ('run = "train"\nstore = "s.zarr"\nhead = "linear"\nseed = 1', "train takes no argument 'seed' "
                                                                       "(did you mean 'seeds'?)"),
        ('run = "sweep"\nstore = "s.zarr"\nhead = "linear"\nout_dir = "x"\ngrid = { lr = [0.1] }',
         "sweep takes no argument 'out_dir' (did you mean 'out'?)"),
        ('run = "sweep"\nstore = "s.zarr"\nhead = "linear"\nout = "x"\ngrid = { lr = [0.1, 0] }', "recipe lr=0: "
                                                                                                  "a number > 0"),
        ('run = "extract"\nmanifest = "m.csv"\nencoder = "null:"\nout = "s.zarr"\nbatch_size = 0', "--batch-size 0"),
        ('run = "extract"\nmanifest = "m.csv"\nencoder = "null:"\nout = "s.zarr"\ndevice = "gpu"', "--device 'gpu'"),
        ('run = "extract"\nmanifest = "m.csv"\nout = "s.zarr"', "step 3 (extract): extract needs encoder"),
        ('run = "extract"\nmanifest = "m.csv"\nencoder = "null:"\nout = "s.zarr"\nviews = ["flip", "erasing"]',
         "unknown view 'erasing' (did you mean 'erase'?)"),
        ('run = "au_cv"\nstore = "s.zarr"\nout = "x"\nrecipe = { balance = "class" }', "expression heads only"),
        (f'run = "extract"\nmanifest = "m.csv"\nencoder = "null:"\nout = "{tiny_dataset}"\noverwrite = true',
         "is not a feature store"),
        ('run = "audit"\nmanifest = "m.csv"\nwithout_leaks = "./m.csv"', "is the manifest it is derived from"),
        # a file no step writes: was found when step 3 was reached, after the steps before it (an extraction) ran
        (f'run = "train"\nstore = "{tmp_path}/s.zarr"\nhead = "linear"',
         f"step 3 (train): store {tmp_path}/s.zarr does not exist, and no earlier step writes it"),
        (f'run = "audit"\nmanifest = "{tmp_path}/n.csv"',
         f"manifest {tmp_path}/n.csv does not exist, and no earlier step writes it (did you mean '{tmp_path}/m.csv'?)"),
        ('run = "runs"\nroot = "x"', "step 3 (runs): root x does not exist, and no earlier step writes it; relative "
                                     "paths are read from "),
    ]
    for third, says in cases:
        r = invoke("run", _pipeline(tmp_path, tiny_dataset, third))
        assert r.exit_code == 2 and says in r.output, (third, r.output)
        assert not (tmp_path / "m.csv").exists()  # step 1 never ran
    p = _pipeline(tmp_path, tiny_dataset, f'run = "audit"\nmanifest = "{tmp_path}/m.csv"')  # written by step 1
    r = invoke("run", p, "--check")
    assert r.exit_code == 0 and "3 step(s) checked, nothing run" in r.output and not (tmp_path / "m.csv").exists()


def test_a_step_reading_a_sweeps_point_is_checked_against_the_points_its_grid_makes(tiny_store, tmp_path):
    """A sweep's `out` was taken as written whole: a misspelt point under it passed the pre-flight check."""
    sweep = (f'[[step]]\nrun = "sweep"\nstore = "{tiny_store}"\nhead = "linear"\nout = "{tmp_path}/sw"\n'
             'grid = { lr = [0.001, 0.01] }\n')

    def check(a: str, b: str, then: str = ""):
        p = tmp_path / "p.toml"
        p.write_text(sweep + f'[[step]]\nrun = "compare"\na = "{tmp_path}/sw/{a}"\nb = "{tmp_path}/sw/{b}"\n{then}')
        return invoke("run", p, "--check")

    r = check("point000", "point001/seed0", f'[[step]]\nrun = "runs"\nroot = "{tmp_path}/sw"\n')
    assert r.exit_code == 0 and "3 step(s) checked, nothing run" in r.output, r.output
    r = check("point000", "point002")  # two values of lr: two points
    assert r.exit_code == 2 and (f"step 2 (compare): b {tmp_path}/sw/point002 does not exist, and no earlier step "
                                 "writes it (did you mean") in " ".join(r.output.split()), r.output
    assert not (tmp_path / "sw").exists()


def test_sweep_axes_take_json_lists_for_list_valued_points(tiny_store, tmp_path):
    from fercache.report import cell

    out = tmp_path / "sw"
    r = invoke("sweep", tiny_store, "--head", "mask", "--axis", "mask=sample,none", "--axis", "budgets=[null, "
                                                                                              "[3,1,1,1]]",
               "--recipe", "epochs=2", "--recipe", "batch_size=8", "--out", out)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted((row["mask"], json.dumps(row["budgets"])) for row in rows) == [
        ("none", "[3, 1, 1, 1]"), ("none", "null"), ("sample", "[3, 1, 1, 1]"), ("sample", "null")]
    point = next(row for row in rows if row["budgets"] and row["mask"] == "sample")
    saved = json.loads((Path(point["runs"][0]) / "config.json").read_text())
    assert saved["hp"] == {"mask": "sample", "budgets": [3, 1, 1, 1]}
    assert "| [3,1,1,1] |" in r.output and "| default |" in r.output
    best = Path(rows[0]["runs"][0]).parent  # sweep.json ranks on validation
    assert f"best on validation: {best} (mask={rows[0]['mask']}, budgets={cell(rows[0]['budgets'])}); " \
        f"its test score: `fercache evaluate {best}`" in " ".join(r.output.split())
    r = invoke("sweep", tiny_store, "--head", "mask", "--axis", "budgets=[null, [3,1", "--out", out)
    assert r.exit_code == 2 and "not a JSON list" in r.output


def test_a_pipeline_sweep_step_names_its_best_point_as_the_cli_does(tiny_store, tmp_path):
    from fercache.pipeline import run_pipeline

    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "sweep"\nstore = "{tiny_store}"\nhead = "linear"\nout = "{tmp_path}/sw"\n'
                 + 'grid = { lr = [1e-3, 1e-1] }\nbase_recipe = { epochs = 2, batch_size = 8 }\n')
    said = []
    run_pipeline(p, on_step=lambda i, step, result: said.append(result), progress=False)
    best = json.loads((tmp_path / "sw" / "sweep.json").read_text())[0]
    assert f"best on validation: {Path(best['runs'][0]).parent} (lr={best['lr']})" in said[0]


def test_heads_lists_every_head_with_its_hyperparameters_and_recipe():
    import inspect

    from fercache.heads import HEADS

    r = invoke("heads", "--json")
    assert r.exit_code == 0
    rows = {d["name"]: d for d in json.loads(r.output)}
    assert sorted(rows) == sorted(HEADS)
    for name, d in rows.items():  # the keys are the factory's keyword-only parameters, with their defaults
        params = inspect.signature(HEADS[name].build).parameters.values()
        assert d["hp"] == {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    assert rows["mask"]["recipe"]["epochs"] == 60 and rows["mask"]["hp"]["n_drop"] is None
    assert rows["temporal"]["level"] == "clip" and rows["au"]["task"] == "au"
    r = invoke("heads", "cvar_mlp")
    assert r.exit_code == 0 and "alpha=0.5" in r.output and "sam_rho=0.5" in r.output and "mask " not in r.output


def test_unknown_hyperparameter_names_the_ones_the_head_takes(tiny_store, tmp_path):
    r = invoke("train-head", tiny_store, "--head", "mask", "--hp", "n_dorp=3", "--out", tmp_path)
    assert r.exit_code == 2 and "no hyperparameter 'n_dorp' (did you mean 'n_drop'?)" in r.output
    assert "n_drop=None" in r.output
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_misspelt_hyperparameter_is_refused_before_any_feature_is_read(tiny_store, tmp_path, monkeypatch):
    from fercache import train

    monkeypatch.setattr(train, "load_features", lambda *a, **k: pytest.fail("features read before the check"))
    r = invoke("train-head", tiny_store, "--head", "linear", "--hp", "normalise=true", "--out", tmp_path)
    assert r.exit_code == 2 and "no hyperparameter 'normalise' (did you mean 'normalize'?)" in r.output


def test_hp_values_parse_python_and_json_literals():
    assert cli._kv(["a=False", "b=false", "c=None", "d=null", "e=3", "f=[1,2]", "g=sample"], "--hp") == {
        "a": False, "b": False, "c": None, "d": None, "e": 3, "f": [1, 2], "g": "sample"}
    assert cli._axis("use_sigmoid=True,False") == ("use_sigmoid", [True, False])


def test_au_cv_on_a_store_without_aus_fails_before_writing(tiny_store, tmp_path):
    out = tmp_path / "au"
    r = invoke("au-cv", tiny_store, "--out", out)
    assert r.exit_code == 2 and "has no AU columns" in r.output
    assert not out.exists()
    # one fold has nothing to train on, and more folds than subjects leave test folds empty: said before any work
    # (--folds 1 was "cannot carve a validation split: fewer than 2 training subjects")
    subjects = len(set(read_manifest(open_store(str(tiny_store)).meta["manifest"]).column("subject")))
    for k in (1, subjects + 1):
        r = invoke("au-cv", tiny_store, "--folds", k, "--out", out)
        assert r.exit_code == 2 and f"--folds {k}: give 2 to {subjects} (the subjects of faces;" in r.output
    assert not out.exists()


def test_cross_from_the_cli_writes_the_matrix_with_settings_per_head(tiny_store, tmp_path):
    out = tmp_path / "cross"
    r = invoke("cross", tiny_store, "--heads", "linear,mask", "--recipe", "epochs=2", "--recipe", "batch_size=8",
               "--recipe", "mask:epochs=3", "--hp", "mask:hidden=16", "--out", out)
    assert r.exit_code == 0, r.output
    for head in ("linear", "mask"):  # one markdown table per head, printed and written, with the recipe override used
        assert (out / f"cross-{head}.md").read_text().strip() in r.output
    config = {h: json.loads((out / "runs" / f"faces-{h}" / "seed0" / "config.json").read_text())
              for h in ("linear", "mask")}
    assert config["linear"]["recipe"]["epochs"] == 2 and config["mask"]["recipe"]["epochs"] == 3
    assert config["mask"]["recipe"]["batch_size"] == 8 and config["mask"]["hp"]["hidden"] == 16
    assert "hidden" not in config["linear"]["hp"]
    r = invoke("cross", tiny_store, "--heads", "linear", "--hp", "mask:hidden=16", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--hp mask:hidden=16: 'mask' is none of the heads (linear)" in r.output
    r = invoke("cross", "--heads", "linear", "--out", out)
    assert r.exit_code == 2 and "Missing argument" in r.output


def test_a_store_or_manifest_passed_where_a_run_goes_is_named_with_the_step_between(tiny_store, tiny_manifest,
                                                                                     tmp_path):
    """`fercache evaluate S.zarr` said only "no trained run (head.pt) in S.zarr or its subfolders"."""
    for args in (("evaluate", tiny_store), ("compare", tiny_store, tiny_store), ("runs", tiny_store),
                 ("predict", tiny_store, tmp_path)):
        r = invoke(*args)
        assert r.exit_code == 2 and f": {tiny_store.name} is a feature store; `fercache train-head {tiny_store} " \
                                    "--head linear` trains a run on it" in r.output, (args, r.output)
    r = invoke("evaluate", tiny_manifest)
    assert r.exit_code == 2 and f": {tiny_manifest.name} is a manifest; extract it into a store" in r.output, r.output


def test_evaluate_and_cross_refuse_each_others_options(tiny_store, tmp_path):
    """`evaluate RUN --heads mask --seeds 1` scored RUN alone and said nothing of the two options; the matrix took
    --split and ignored it. Each is refused, naming the option, before anything is read or trained."""
    run = tmp_path / "runs"
    assert invoke("train-head", tiny_store, "--head", "linear", "--recipe", "epochs=1", "--out", run).exit_code == 0
    run = run / "faces-linear" / "seed0"
    r = invoke("evaluate", run, "--heads", "mask", "--seeds", "1")
    assert r.exit_code == 2 and "No such option: --heads" in " ".join(r.output.split())
    assert not list(run.glob("eval-*"))
    r = invoke("cross", tiny_store, "--split", "val", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "No such option: --split" in " ".join(r.output.split())
    assert not (tmp_path / "x").exists()
    assert invoke("evaluate", run, "--split", "val").exit_code == 0 and (run / "eval-faces-val").is_dir()


def test_cross_and_folds_take_heads_comma_separated_or_repeated(tiny_store, tiny_manifest, tmp_path):
    """cross took `--heads a,b` and folds `--head a --head b`: each refused the other's spelling."""
    assert cli._names(["linear,mask", " au ", "temporal@mean,"]) == ["linear", "mask", "au", "temporal@mean"]
    for args in (["cross", tiny_store], ["folds", tiny_store, "-m", tiny_manifest]):
        for heads in (["--head", "linear", "--head", "nope"], ["--heads", "linear,nope"]):
            r = invoke(*args, *heads, "--out", tmp_path / "x")
            assert r.exit_code == 2 and "unknown head 'nope'" in r.output, (args, heads, r.output)
    assert not (tmp_path / "x").exists()  # refused before anything was trained


def test_train_head_keeps_a_run_trained_with_other_settings(tiny_store, tmp_path):
    args = ("train-head", tiny_store, "--head", "linear", "--recipe", "batch_size=8", "--out", tmp_path)
    r = invoke(*args, "--recipe", "epochs=2")
    assert r.exit_code == 0, r.output
    config = tmp_path / "faces-linear" / "seed0" / "config.json"
    first = config.read_text()
    r = invoke(*args, "--recipe", "epochs=2")  # the same settings again: a re-run, allowed
    assert r.exit_code == 0, r.output
    r = invoke(*args, "--recipe", "epochs=3")
    assert r.exit_code == 2 and "other settings (recipe: epochs 2 -> 3)" in r.output and "--overwrite" in r.output
    assert config.read_text() == first  # kept as it was
    r = invoke(*args, "--recipe", "epochs=3", "--overwrite")
    assert r.exit_code == 0 and json.loads(config.read_text())["recipe"]["epochs"] == 3


def test_compare_two_heads_on_the_same_test_samples(tiny_store, tmp_path):
    r = invoke("cross", tiny_store, "--heads", "linear,mask", "--seeds", "0,1",
               "--recipe", "epochs=3", "--recipe", "batch_size=8", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    a, b = tmp_path / "runs" / "faces-linear", tmp_path / "runs" / "faces-mask"
    r = invoke("compare", a, b, "-o", tmp_path / "cmp.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "cmp.json").read_text())
    assert res["seeds_a"] == res["seeds_b"] == 2 and res["n"] == 24 and res["dropped"] == 0
    # A seed group is the mean of its seeds: the same number `evaluate` reports for it.
    for run, key in ((a, "a"), (b, "b")):
        seeds = [json.loads((run / f"seed{s}" / "eval-faces-test" / "metrics.json").read_text())["accuracy"]
                 for s in (0, 1)]
        assert abs(res["metrics"]["accuracy"][key] - sum(seeds) / 2) < 1e-9
    m = res["metrics"]["uar"]
    assert m["ci95"][0] <= m["diff"] <= m["ci95"][1] and 0 <= m["p"] <= 1
    assert f"{100 * m['diff']:+7.2f}" in r.output and "24 samples" in r.output
    r = invoke("compare", a, a)
    assert r.exit_code == 0 and "+0.00  [+0.0, +0.0]" in r.output
    r = invoke("compare", a / "seed0", tmp_path / "nowhere")
    assert r.exit_code == 2 and "no trained run" in r.output
    # --out in a new folder is made; under a file, refused before the bootstrap (it was an OSError after it)
    r = invoke("compare", a, b, "-o", tmp_path / "new" / "cmp.json")
    assert r.exit_code == 0 and json.loads((tmp_path / "new" / "cmp.json").read_text())["n"] == 24
    r = invoke("compare", a, b, "-o", tmp_path / "cmp.json" / "c.json")
    assert (r.exit_code == 2 and "is a file, not a folder; choose another --out" in r.output
            and "samples" not in r.output)


def test_an_output_file_under_a_file_is_refused_before_the_work(tiny_store, tiny_manifest, tiny_dataset,
                                                                 tiny_encoder_spec, tmp_path):
    """extract, export, predict, runs: the OS's 'Not a directory' or 'File exists', after the work for export."""
    (tmp_path / "notes").write_text("mine")
    under = tmp_path / "notes"
    for args, flag, path in [(("extract", tiny_manifest, "--encoder", tiny_encoder_spec, "--data-root", tiny_dataset,
                               "--out", under / "s.zarr"), "--out", under / "s.zarr"),
                             (("export", tiny_store, "--to", under / "s.h5"), "--to", under / "s.h5"),
                             (("predict", tmp_path, tmp_path, "--out", under / "p.csv"), "--out", under / "p.csv"),
                             (("runs", tmp_path, "--csv", under / "r.csv"), "--csv", under / "r.csv")]:
        r = invoke(*args)
        assert r.exit_code == 2 and f"{flag} {path}: {under} is a file, not a folder; choose another {flag}" in \
            " ".join(r.output.split()), r.output
    for args, flag in [(("runs", tmp_path, "--csv", tmp_path), "--csv"),
                       (("compare", tmp_path, tmp_path, "-o", tmp_path), "--out")]:
        r = invoke(*args)  # 'Is a directory', after the ledger or the bootstrap
        assert (r.exit_code == 2 and f"{flag} {tmp_path} is a folder; {flag} names the file to "
                                     "write" in " ".join(r.output.split()))
    assert [p.name for p in tmp_path.iterdir()] == ["notes"] and under.read_text() == "mine"


def test_cross_matrix_on_other_labels_trains_and_tests_with_them(tiny_store, tiny_manifest, tmp_path):
    from fercache.audit import without_leaks
    from fercache.manifests import read_manifest, write_manifest

    m = read_manifest(tiny_manifest)
    gone = [r["sample_id"] for r in m.rows if r["split"] in ("val", "test")][::4]  # 6 val, 6 test rows unlabelled
    clean = write_manifest(without_leaks(m, gone), tmp_path / "faces-clean.csv")
    args = ("cross", tiny_store, "--heads", "linear", "--recipe", "epochs=2", "--recipe",
            "batch_size=8", "--out", tmp_path / "x")
    r = invoke(*args, "--labels", f"faces={clean}")
    assert r.exit_code == 0, r.output
    cell = json.loads((tmp_path / "x" / "cross-linear.json").read_text())["faces -> faces"]
    assert cell["n"] == 18  # 24 test images, 6 unlabelled
    run = tmp_path / "x" / "runs" / "faces-linear" / "seed0"
    assert json.loads((run / "config.json").read_text())["manifest"] == str(clean)
    assert json.loads((run / "metrics.json").read_text())["n_val"] == 18  # selection never saw the unlabelled val rows
    r = invoke(*args, "--labels", f"nosuch={clean}")
    assert r.exit_code == 2 and "--labels names nosuch, which is none of the stores (faces)" in r.output


def test_extract_refuses_bad_numbers_before_creating_the_store(tiny_manifest, tiny_dataset, tmp_path):
    out = tmp_path / "s.zarr"
    p = tmp_path / "p.toml"  # a pipeline's extract step is checked the same way, before its first step
    p.write_text(f'[[step]]\nrun = "extract"\nmanifest = "{tiny_manifest}"\nencoder = "null:"\nout = "{out}"\n'
                 'views = ["flip", "flip"]\n')
    r = invoke("run", p, "--check")
    assert r.exit_code == 2 and "--views flip,flip: flip given twice" in r.output, r.output
    for args, says in [(["--batch-size", "0"], "--batch-size 0: at least 1"), (["--workers", "-1"], "--workers -1: 0"),
                       (["--chunk-rows", "0"], "--chunk-rows 0: at least 1 row"),
                       (["--precision", "fp8"], "--precision "
                                                                                                           "fp8: "
                                                                                                           "auto, "
                                                                                                           "fp32"),
                       (["--image-size", "0"], "--image-size 0: leave it out"),
                       # crashed writing the first chunk (shape mismatch), the store already created
                       (["--views", "flip,flip"], "--views flip,flip: flip given twice; each view is cached once")]:
        r = invoke("extract", tiny_manifest, "--encoder", "null:", "--out", out, "--data-root", tiny_dataset, *args)
        assert r.exit_code == 2 and says in r.output, (args, r.output)
        assert not out.exists()


def test_evaluate_on_a_split_the_manifest_lacks_names_the_ones_it_has(tiny_store, tmp_path):
    r = invoke("train-head", tiny_store, "--head", "linear", "--recipe", "epochs=1", "--out", tmp_path)
    run = next(tmp_path.glob("*/seed0"))
    r = invoke("evaluate", run, "--split", "tset")
    assert r.exit_code == 2 and "has no 'tset' rows; its manifest's splits: test (24), train (24), val (24)" in r.output


def test_comma_separated_numbers_are_checked_by_the_cli():
    import typer

    assert cli._ints("0, 1,2") == [0, 1, 2] and cli._ints("10000,100000", "--sizes", least=1) == [10000, 100000]
    for text, least in [("x", 0), ("", 0), ("-1", 0), ("0", 1)]:
        with pytest.raises(typer.BadParameter, match="comma-separated whole numbers"):
            cli._ints(text, least=least)


def test_quiet_turns_off_progress_bars_in_commands_and_pipelines(tiny_store, tiny_dataset, tiny_encoder_spec, tmp_path):
    """`-q` is for scripted runs: their logs should not fill with progress-bar redraws (bars are not warnings)."""
    def bars(*args):
        r = runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.stderr

    train = ("train-head", tiny_store, "--head", "linear", "--out", tmp_path / "runs", "--recipe", "epochs=3")
    assert "epoch/s" in bars(*train)
    assert "epoch/s" not in bars("-q", *train)
    predict = ("predict", tmp_path / "runs" / "faces-linear" / "seed0", tiny_dataset / "faces" / "test", "-o",
               tmp_path / "p.csv")
    assert "predict: 100%" in bars(*predict) and "predict" not in bars("-q", *predict)  # was silent for any number
    export = ("export", tiny_store, "--to", tmp_path / "s.h5")
    assert "export: 100%" in bars(*export) and "export" not in bars("-q", *export)
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "extract"\nmanifest = "{tmp_path}/m.csv"\nencoder = "{tiny_encoder_spec}"\n'
                 f'root = "{tiny_dataset}"\nout = "{{out}}"\nworkers = 0\n[vars]\nout = "{tmp_path}/a.zarr"\n')
    assert runner.invoke(cli.app, ["manifest", "build", str(tiny_dataset / "faces"), "-f", "imagefolder",
                                   "-o", str(tmp_path / "m.csv"), "--data-root", str(tiny_dataset)]).exit_code == 0
    assert "img/s" in bars("run", p)
    p.write_text(p.read_text().replace("a.zarr", "b.zarr"))
    assert "img/s" not in bars("-q", "run", p) and (tmp_path / "b.zarr").is_dir()


def test_every_argument_and_option_of_every_command_has_help():
    """`--help` is the manual users read first: a new option without a line of help fails here."""
    import typer.main

    def undocumented(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from undocumented(sub, f"{path} {name}")
        for p in [] if getattr(command, "commands", None) else command.params:
            if p.name != "help" and not getattr(p, "help", None):
                yield f"{path.strip()}: {p.name}"

    assert list(undocumented(typer.main.get_command(cli.app), "")) == []
    r = runner.invoke(cli.app, ["sweep", "--help"])
    assert r.exit_code == 0 and "checked before any data is read" in " ".join(r.output.replace("│", " ").split())


def test_manifest_build_replaces_a_manifest_but_never_another_file(tiny_dataset, tmp_path):
    """`-o` naming a dataset's own label file (a typo away from the manifest's name) must not destroy it."""
    native = tmp_path / "fer2013.csv"
    native.write_text("emotion,pixels,Usage\n0,70 80 82,Training\n")
    r = invoke("manifest", "build", tiny_dataset / "faces", "-f", "imagefolder", "-o", native, "--data-root",
               tiny_dataset)
    assert r.exit_code == 2 and "is not a manifest" in r.output
    assert native.read_text() == "emotion,pixels,Usage\n0,70 80 82,Training\n"
    gz = tmp_path / "m.csv.gz"
    gz.write_bytes(b"not gzip at all")
    assert invoke("manifest", "build", tiny_dataset / "faces", "-f", "imagefolder", "-o", gz).exit_code == 2
    m = tmp_path / "m.csv"
    for _ in range(2):  # rebuilding over its own earlier output is fine
        r = invoke("manifest", "build", tiny_dataset / "faces", "-f", "imagefolder", "-o", m, "--data-root",
                   tiny_dataset)
        assert r.exit_code == 0 and "72 rows" in r.output


def test_a_sweep_shows_its_points_going_by_unless_quiet(tiny_store, tmp_path):
    """A sweep of many points runs for minutes: a bar over the points, with the best validation score so far."""
    args = ["sweep", str(tiny_store), "--head", "linear", "--axis", "lr=0.01,0.1", "--recipe", "epochs=2",
            "--out", str(tmp_path / "sw")]
    r = runner.invoke(cli.app, args, catch_exceptions=False)
    assert r.exit_code == 0 and "2/2" in r.stderr and "best val accuracy=" in r.stderr
    r = runner.invoke(cli.app, ["-q"] + args, catch_exceptions=False)
    assert r.exit_code == 0 and "point" not in r.stderr and "| rank | lr |" in r.stdout


def test_steps_lists_what_each_pipeline_step_needs_and_takes():
    r = invoke("steps", "--json")
    rows = {d["kind"]: d for d in json.loads(r.output)}
    from fercache.pipeline import STEPS

    assert r.exit_code == 0 and set(rows) == set(STEPS)
    train = rows["train"]
    assert train["needs"] == ["store", "head"] and "fercache train-head" in train["summary"]
    assert train["optional"]["out"] == "runs" and train["optional"]["progress"] is True  # the step's own default
    assert "out_dir" not in train["optional"] and "seed" not in train["optional"]
    assert "encoder_obj" not in rows["extract"]["optional"] and rows["extract"]["optional"]["batch_size"] == 256
    assert rows["sweep"]["optional"]["views"] is True  # handed on to every point's fit
    r = invoke("steps", "cross")
    assert r.exit_code == 0 and "needs     stores heads out" in r.output and 'metric="accuracy"' in r.output
    r = invoke("steps", "trian")
    assert r.exit_code == 2 and "did you mean 'train'?" in r.output


def test_the_console_shows_our_progress_lines_not_the_libraries_info_or_the_random_init_warning(
        tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fercache", "extract", str(tiny_manifest), "--encoder", tiny_encoder_spec,
           "--out", str(tmp_path / "s.zarr"), "--data-root", str(tiny_dataset), "--workers", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    # open_clip logs each step of building the model at INFO on the root logger, and warns that a model with no
    # weights is random: asked for here (a test config), so both are noise
    assert "root:" not in first and "initialized randomly" not in first, first
    again = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    assert "INFO fercache.extract: " in again and "is complete and matches; nothing to do" in again, again
    verbose = subprocess.run(cmd[:3] + ["-v"] + cmd[3:], capture_output=True, text=True, check=True).stderr
    assert "root: Loaded" in verbose or "root: Instantiating" in verbose, verbose


def test_predict_refuses_an_out_it_cannot_write_before_reading_an_image_and_makes_its_folder(tiny_store, tiny_dataset,
                                                                                              tmp_path, caplog):
    """--out p.txt was refused only after every image had been encoded; --out into a new folder was an OSError."""
    assert invoke("train-head", tiny_store, "--head", "linear", "--out", tmp_path / "runs", "--recipe",
                  "epochs=2").exit_code == 0
    run, images = tmp_path / "runs" / "faces-linear" / "seed0", tiny_dataset / "faces" / "test"
    r = runner.invoke(cli.app, ["predict", str(run), str(images), "-o", str(tmp_path / "p.txt")])
    assert isinstance(r.exception,
                      cli.FercacheError) and str(r.exception) == "--out must end in .json or .csv, got p.txt"
    assert "predict:" not in r.stderr  # no image was read
    r = invoke("predict", run, images, "-o", tmp_path / "new" / "sub" / "p.json")
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "new" / "sub" / "p.json").read_text())) == 24
    # the summary line tallies the predictions the file holds, most frequent first
    r = invoke("predict", run, images, "-o", tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        counts = collections.Counter(row["prediction"] for row in csv.DictReader(f)).most_common()
    assert sum(n for _, n in counts) == 24 and len(counts) >= 2, counts
    assert f"p.csv: 24 predicted ({', '.join(f'{c} {n}' for c, n in counts)})\n" in r.stdout, r.stdout
    # a file that fails is said, on the summary line and in a warning, not only in the output's error column
    (tmp_path / "broken.jpg").write_bytes(b"xx")
    r = runner.invoke(cli.app, ["predict", str(run), str(images / "happy" / "test_happy_000.jpg"),
                                str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "q.csv")])
    assert r.exit_code == 0 and f"{tmp_path / 'q.csv'}: 1 predicted, 1 failed (see the error column)" in r.stdout
    assert f"1 of 2 inputs failed (their rows carry the error, no prediction), e.g. {tmp_path / 'broken.jpg'}: " \
        "UnidentifiedImageError" in caplog.text


def test_protocol_commands_run_again_reuse_their_finished_runs_unless_retrain(tiny_store, tmp_path, caplog):
    """An interrupted cross matrix (or folds, au-cv) trained every run again when re-run."""
    cross = ("cross", tiny_store, "--head", "linear", "--recipe", "epochs=2", "-o", tmp_path)
    assert invoke(*cross).exit_code == 0
    head = tmp_path / "runs" / "faces-linear" / "seed0" / "head.pt"
    stamp = head.stat().st_mtime_ns
    assert invoke(*cross).exit_code == 0 and head.stat().st_mtime_ns == stamp
    assert f"reused 1 finished run(s) trained with the same settings, data and code: {head.parent}" in caplog.text
    assert invoke(*cross, "--retrain").exit_code == 0 and head.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("command", ["extract", "head"])
def test_bench_n_images_below_one_is_a_usage_error(tiny_manifest, command):
    """--n-images 0 silently benchmarked every row; -1 wrote an empty subset."""
    r = runner.invoke(cli.app, ["bench", command, str(tiny_manifest), "--n-images", "0"])
    assert r.exit_code == 2 and "Invalid value for '--n-images'" in r.output


@pytest.mark.parametrize("args,message", [
    (["train-head", "s.zarr", "--recipe", "epochs=1", "--recipe", "epochs=2"], "--recipe epochs is given twice (1, 2); "
                                                                               "give each key once"),
    (["au-cv", "s.zarr", "--hp", "hidden=8", "--hp", "hidden=16"], "--hp hidden is given twice (8, 16)"),
    (["cross", "s.zarr", "--labels", "s=a.csv", "--labels", "s=b.csv"], "--labels s is given twice"),
    (["manifest", "build", ".", "-f", "ckplus", "-o", "m.csv", "--option", "facs=a", "--option", "facs=b"], "--option "
                                                                                                            "facs is "
                                                                                                            "given "
                                                                                                            "twice"),
    (["train-head", "s.zarr", "--hp", "hidden"], "--hp takes key=value, got 'hidden'"),
    (["sweep", "s.zarr", "--axis", "lr=1e-3", "--recipe", "epochs"], "--recipe takes key=value, got 'epochs'")])
def test_a_key_given_twice_or_without_a_value_is_refused_and_the_flag_named(args, message):
    """--recipe epochs=1 --recipe epochs=2 trained 2 epochs, unsaid; --hp hidden was '--option takes key=value'."""
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_a_sweep_axis_also_fixed_by_recipe_or_hp_is_refused(tiny_store, tmp_path):
    """--recipe lr=1e-3 --axis lr=1e-2,1e-1: the axis won and the fixed value was dropped without a word."""
    from fercache.errors import ConfigError
    from fercache.sweeps import sweep

    with pytest.raises(ConfigError, match=r"^lr: both a sweep axis and a fixed --recipe/--hp value "
                                          r"\(base_recipe/base_hp in a pipeline\); give it one way$"):
        sweep(str(tiny_store), "linear", {"lr": [1e-2, 1e-1]}, tmp_path / "s", base_recipe={"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"^n_drop: both a sweep axis"):
        sweep(str(tiny_store), "mask", {"n_drop": [1, 2]}, tmp_path / "s", base_hp={"n_drop": 4})
    assert not (tmp_path / "s").exists()


def test_json_outputs_are_one_document_on_stdout(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    """extract, train-head, evaluate, sweep and runs with --json: stdout parses as JSON (logs stay on stderr)."""
    store = tmp_path / "s.zarr"

    def parsed(*args):
        r = runner.invoke(cli.app, [str(a) for a in args] + ["--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    ext = parsed("extract", tiny_manifest, "--encoder", tiny_encoder_spec, "--data-root", tiny_dataset, "--out", store,
                 "--workers", "0")
    assert ext["rows"] == 72 and ext["n_ok"] == 72 and ext["store"].endswith("s.zarr")
    (run,) = parsed("train-head", store, "--recipe", "epochs=2", "--out", tmp_path / "runs")
    assert run["metrics"]["selection"]["split"] == "val" and run["reused"] is False
    (res,) = parsed("evaluate", run["run_dir"])
    assert res["runs"][0]["n"] == 24 and 0 <= res["summary"]["accuracy"]["mean"] <= 1
    sw = parsed("sweep", store, "--head", "linear", "--axis", "lr=0.01,0.1", "--recipe", "epochs=2", "-o",
                tmp_path / "sw")
    assert len(sw["rows"]) == 2 and sw["best"] == sw["rows"][0] and sw["axes"] == ["lr"]
    led = parsed("runs", tmp_path)
    assert len(led["records"]) == 3 and led["stale"] == [] and led["records"][0]["status"]["status"] == "ok"
    assert {row["head"] for t in led["tables"] for row in t["rows"]} == {"linear"}
    assert invoke("--version").output.strip() == f"fercache {cli_version()}"


def cli_version() -> str:
    from fercache import __version__

    return __version__


def test_predict_names_a_misspelt_folder_on_the_way_before_loading_the_run(tiny_store, tiny_dataset, tmp_path,
                                                                          monkeypatch):
    from fercache import predict

    assert invoke("train-head", tiny_store, "--recipe", "epochs=1", "--out", tmp_path).exit_code == 0
    monkeypatch.setattr(predict, "load_heads", lambda *a, **k: pytest.fail("the run was loaded before the inputs"))
    typo = tiny_dataset / "faecs" / "test" / "happy"
    r = invoke("predict", tmp_path / "faces-linear" / "seed0", typo)
    assert r.exit_code == 2 and f"{typo} is neither an image file nor a folder (did you mean " \
        f"'{tiny_dataset / 'faces' / 'test' / 'happy'}'?)" in r.output, r.output
