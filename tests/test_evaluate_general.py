"""distill_scripts/evaluate.py's general mode: prompts from a file or a streamed data set (captions only), a Hub id
reaching the loader, and runs on the committed digits teachers (image and video) with tiny random-weight DINOv2 /
CLIP models loaded by path: the report, the FD ordering a real evaluation relies on, resume without regenerating."""

import argparse
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "distill_scripts"))
ASSETS = os.path.join(ROOT, "distill_scripts", "digits", "assets")
SDXL_TEACHER = os.path.join(ASSETS, "digits-sdxl-teacher")
VIDEO_TEACHER = os.path.join(ASSETS, "digits-cogvideox-teacher")

import evaluate  # noqa: E402
from test_metrics import save_tiny_clip, save_tiny_dinov2, smooth_images  # noqa: E402


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return save_tiny_dinov2(root / "dinov2"), save_tiny_clip(root / "clip")


def _env(tmp_path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), PYTHONWARNINGS="ignore")


def _prompt_args(**kwargs) -> argparse.Namespace:
    base = dict(prompts_file=None, dataset_name=None, dataset_config_name=None, caption_column="text",
                split="train", max_prompts=None)
    return argparse.Namespace(**(base | kwargs))


def test_prompts_from_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red fox\n\n  a city   at night \nan old map\n")
    assert evaluate.load_prompt_set(_prompt_args(prompts_file=str(txt)))[0] == ["a red fox", "a city at night",
                                                                                "an old map"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a red fox"}\n{"text": "a blue car", "id": 3}\n{"prompt": "a bowl of soup"}\n')
    prompts, source = evaluate.load_prompt_set(_prompt_args(prompts_file=str(jsonl), max_prompts=2))
    assert prompts == ["a red fox", "a blue car"] and source == "prompts.jsonl, first 2 prompts"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"caption": "no field"}\n')
    from dmdx.training.errors import UsageError

    with pytest.raises(UsageError, match="line 2"):
        evaluate.load_prompt_set(_prompt_args(prompts_file=str(bad)))


def test_captions_streamed_without_touching_images(tmp_path, monkeypatch):
    """An imagefolder caption data set whose image files are not images: reading the captions must never decode
    (or, for a Hub data set, download) them."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "captions" / "train"
    folder.mkdir(parents=True)
    captions = ["a red fox in the snow", "two green apples", "", "a lighthouse at dusk"]
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            (folder / f"{i}.png").write_bytes(b"not a png")  # decoding any of these would raise
            f.write(json.dumps({"file_name": f"{i}.png", "caption": [caption, "another"]}) + "\n")
    args = _prompt_args(dataset_name="imagefolder", caption_column="caption", max_prompts=2)
    from datasets import load_dataset

    real = load_dataset

    def imagefolder(name, config=None, **kwargs):  # the local folder in place of a Hub data set
        assert kwargs.get("streaming") is True
        return real(name, data_dir=str(tmp_path / "captions"), **kwargs)

    monkeypatch.setattr("datasets.load_dataset", imagefolder)
    prompts, source = evaluate.load_prompt_set(args)
    assert prompts == ["a red fox in the snow", "two green apples"] and "column 'caption'" in source
    args.max_prompts = None  # the empty caption is skipped
    assert evaluate.load_prompt_set(args)[0] == ["a red fox in the snow", "two green apples", "a lighthouse at dusk"]
    from dmdx.training.errors import UsageError

    args.caption_column = "text"
    with pytest.raises(UsageError, match="'text' is not a column"):
        evaluate.load_prompt_set(args)
    monkeypatch.setattr("datasets.load_dataset", real)
    data = tmp_path / "captions.jsonl"  # a local JSON file, streamed
    data.write_text('{"text": "a paper boat", "n": 1}\n{"text": "a brass key", "n": 2}\n')
    assert evaluate.load_prompt_set(_prompt_args(dataset_name=str(data)))[0] == ["a paper boat", "a brass key"]
    # parquet (how Hub data sets are stored): only the caption column is read from the file
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": b"not a png", "path": "0.png"}] * 2, "caption": ["a kite", "a drum"]})
    pq.write_table(table, tmp_path / "captions.parquet")
    calls = []

    def spy(*a, **kwargs):
        calls.append(kwargs.get("columns"))
        return real(*a, **kwargs)

    monkeypatch.setattr("datasets.load_dataset", spy)
    args = _prompt_args(dataset_name=str(tmp_path / "captions.parquet"), caption_column="caption")
    assert evaluate.load_prompt_set(args)[0] == ["a kite", "a drum"] and calls == [["caption"]]


def test_hub_id_reaches_the_loader(tmp_path, monkeypatch, capsys, metric_models):
    """An id such as stabilityai/stable-diffusion-3-medium-diffusers is looked up as a Hub id (offline: an error
    naming it), a missing folder is "not a diffusers pipeline folder", a metric model flag is checked likewise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    hub_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    common = ["--prompts_file", str(prompts), "--dinov2_model", metric_models[0], "--clip_model", metric_models[1]]
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", f"teacher={hub_id}:28:7.0", *common])
    err = capsys.readouterr().err
    assert f"Hub id '{hub_id}'" in err and "not a diffusers pipeline folder" not in err, err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", f"teacher={tmp_path / 'missing'}:28:7.0", *common])
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", f"teacher={SDXL_TEACHER}:2:0", "--prompts_file", str(prompts),
                             "--dinov2_model", "facebook/dinov2-large", "--clip_model", metric_models[1]])
    err = capsys.readouterr().err
    assert "--dinov2_model 'facebook/dinov2-large'" in err and "HF_HUB_OFFLINE" in err, err
    args = evaluate.parse_args(["--pipeline", f"teacher={SDXL_TEACHER}:25:3", *common, "--torch_dtype", "bf16"])
    assert args.general and not args.video and args.num_images_per_prompt == 1 and args.torch_dtype == "bf16"


def _run(cmd, tmp_path, code=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "distill_scripts", "evaluate.py"), *cmd],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_general_mode_on_the_digits_teacher_and_resume(tmp_path, metric_models):
    """The issue's command on the digits SDXL teacher with prompts that are not all digits, plus a second seed of
    the teacher and its 2-step samples (--spec): FD_DINOv2 to the 25-step samples must rank 2 steps above the
    sampling-noise floor. Then an interrupted run resumes: only the missing sample is generated, bit-identical."""
    dinov2, clip = metric_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit seven\na red fox in the snow\n"
                       "a city at night\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([
        {"name": "teacher_seed1", "path": SDXL_TEACHER, "num_inference_steps": 25, "guidance_scale": 3.0, "seed": 1},
        {"name": "teacher_2steps", "path": SDXL_TEACHER, "num_inference_steps": 2, "guidance_scale": 3.0, "seed": 2,
         "call_kwargs": {"negative_prompt": "blurry"}},
    ]))
    real = tmp_path / "real"
    real.mkdir()
    for i, image in enumerate(smooth_images(6)):
        image.save(real / f"{i}.jpg")
    out = tmp_path / "eval"
    cmd = ["--prompts_file", str(prompts), "--pipeline", f"teacher={SDXL_TEACHER}:25:3",
           "--pipeline", f"student={SDXL_TEACHER}:1:0", "--spec", str(spec), "--dinov2_model", dinov2,
           "--clip_model", clip, "--output_dir", str(out), "--num_images_per_prompt", "4", "--batch_size", "8",
           "--reference_images", str(real)]
    _run(cmd, tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["teacher", "student", "teacher_seed1", "teacher_2steps"]
    for name, r in report.items():
        assert "error" not in r, (name, r)
        assert list(r)[:len(evaluate.GENERAL_METRIC_KEYS)] == list(evaluate.GENERAL_METRIC_KEYS)
        assert 0 <= r["clip_score"] <= 100 and r["seconds_per_image"] > 0 and r["diversity"] > 0
        assert r["fd_dinov2_real"] > 0 and r["pickscore"] is None
        assert (r["num_prompts"], r["num_images_per_prompt"], r["num_images"]) == (4, 4, 16)
        assert r["prompt_set"] == "prompts.txt, 4 prompts" and r["dinov2_model"] == dinov2
        assert r["pipeline_class"] == "StableDiffusionXLPipeline" and r["reference_pipeline"] == "teacher"
        assert len(os.listdir(out / "samples" / name)) == 16 + 2  # PNGs, metadata.jsonl, settings.json
    assert report["teacher"]["fd_dinov2_to_teacher"] is None and report["teacher"]["diversity"] == 1.0
    assert report["student"]["nfe"] == 1 and report["teacher"]["nfe"] == 50
    assert report["teacher_2steps"]["call_kwargs"] == {"negative_prompt": "blurry"}
    floor = report["teacher_seed1"]["fd_dinov2_to_teacher"]
    assert report["teacher_2steps"]["fd_dinov2_to_teacher"] > 1.5 * floor > 0, report
    md = (out / "report.md").read_text()
    assert "| teacher | 25 | 3 | 50 | ref. | ref. |" in md and "prompts.txt, 4 prompts; 4 samples per prompt" in md
    assert f"`{dinov2}`" in md and "PickScore off" in md
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.size[0] > 4 * 256 and im.size[1] == 4 * 256 + 24  # 4 rows of 256 px under the prompts

    # the report as a model card's teacher-vs-student table: measured cells, the student's row marked
    from dmdx.pipelines.model_card import evaluation_table, load_evaluation_report

    table = evaluation_table(load_evaluation_report(str(out / "report.json")), "student")
    row = next(line for line in table.splitlines() if line.startswith("| **student** (this model) |"))
    header = table.splitlines()[0].split(" | ")
    cells = row.split(" | ")
    assert cells[header.index("FD_DINOv2 to teacher ↓")] != "–" and cells[header.index("CLIP score ↑")] != "–"

    # interrupt: one student sample lost its file and its record; everything else stays untouched
    folder = out / "samples" / "student"
    lost = folder / "p00002_s001.png"
    original = lost.read_bytes()
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(line for line in lines if lost.name not in line) + "\n")
    lost.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    proc = _run(cmd, tmp_path)
    assert "student: 15 samples on disk, 1 to generate" in proc.stdout
    assert "teacher: 16 samples on disk, 0 to generate" in proc.stdout
    assert lost.read_bytes() == original  # the same seed gives the same sample
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing else was written again
    again = json.loads((out / "report.json").read_text())
    for name in report:
        assert again[name]["fd_dinov2_to_teacher"] == report[name]["fd_dinov2_to_teacher"]
        assert again[name]["clip_score"] == pytest.approx(report[name]["clip_score"])
    # the same folder with other settings for a pipeline is refused, naming what changed
    proc = _run([*cmd[:4], "--pipeline", f"student={SDXL_TEACHER}:2:0", *cmd[6:]], tmp_path, code=2)
    assert "'student' made with other settings" in proc.stderr and "num_inference_steps" in proc.stderr
    # two such reports aggregate into mean ± sd
    agg = evaluate.main(["--aggregate", str(out / "report.json"), str(out / "report.json"),
                         "--output_dir", str(tmp_path / "agg")])
    assert agg["teacher_2steps"]["fd_dinov2_to_teacher"]["mean"] == pytest.approx(
        report["teacher_2steps"]["fd_dinov2_to_teacher"])
    assert "FD_DINOv2 to teacher" in (tmp_path / "agg" / "report.md").read_text()


@pytest.mark.slow
def test_general_mode_on_the_video_demo_teacher(tmp_path, metric_models):
    """The video demo's CogVideoX teacher and a 1-step student through the general mode: frames and GIFs on disk,
    per-frame metrics, subject consistency and motion relative to the teacher."""
    dinov2, clip = metric_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a handwritten digit three moving left"}\n{"text": "a red kite in the wind"}\n')
    out = tmp_path / "eval"
    _run(["--prompts_file", str(prompts), "--pipeline", f"teacher={VIDEO_TEACHER}:25:3",
          "--pipeline", f"student={VIDEO_TEACHER}:1:0", "--dinov2_model", dinov2, "--clip_model", clip,
          "--output_dir", str(out), "--num_images_per_prompt", "2", "--pickscore_model", clip], tmp_path)
    report = json.loads((out / "report.json").read_text())
    for name, r in report.items():
        assert list(r)[:len(evaluate.GENERAL_VIDEO_METRIC_KEYS)] == list(evaluate.GENERAL_VIDEO_METRIC_KEYS)
        assert r["pipeline_class"] == "CogVideoXPipeline" and r["num_frames"] == 9 and r["num_videos"] == 4
        assert 0 < r["subject_consistency"] <= 1 and r["motion_magnitude_raw"] > 0 and r["seconds_per_video"] > 0
        assert r["pickscore"] is not None and r["pickscore_model"] == clip
        clip_dir = out / "samples" / name / "p00001_s001"
        assert sorted(os.listdir(clip_dir)) == [f"{t:03d}.png" for t in range(9)]
        assert (out / "samples" / name / "p00001_s001.gif").is_file()
    assert report["teacher"]["motion_magnitude"] == 1.0 and report["student"]["fd_dinov2_to_teacher"] > 0
    assert (out / "samples.gif").is_file() and "subject consistency" in (out / "report.md").read_text()


@pytest.mark.heavy
def test_general_mode_sharded_over_two_processes(tmp_path, metric_models):
    """accelerate launch with 2 CPU processes (DDP over gloo): each writes its share of the batches, the main
    process merges the records and scores; the samples match a one-process run of the same command."""
    dinov2, clip = metric_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na city at night\na bowl of soup\n")
    common = ["--prompts_file", str(prompts), "--pipeline", f"teacher={SDXL_TEACHER}:4:3",
              "--pipeline", f"student={SDXL_TEACHER}:1:0", "--dinov2_model", dinov2, "--clip_model", clip,
              "--num_images_per_prompt", "3", "--batch_size", "2"]
    from conftest import free_port

    env = _env(tmp_path) | {"ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), os.path.join(ROOT, "distill_scripts", "evaluate.py")]
    proc = subprocess.run([*launch, *common, "--output_dir", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run([*common, "--output_dir", str(tmp_path / "one")], tmp_path)
    import numpy as np
    from PIL import Image

    for name in ("teacher", "student"):
        folder = tmp_path / "two" / "samples" / name
        assert not list(folder.glob("metadata.rank*.jsonl"))  # merged into metadata.jsonl
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(p, s) for p in range(3)
                                                                             for s in range(3)]
        for r in records:  # same seed, same sample, whichever process drew it in whichever batch
            a = np.asarray(Image.open(folder / r["file"]), dtype=np.float64)
            b = np.asarray(Image.open(tmp_path / "one" / "samples" / name / r["file"]), dtype=np.float64)
            assert np.abs(a - b).mean() < 1.0, (name, r["file"])
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["student"]["num_images"] == 9 and report["student"]["fd_dinov2_to_teacher"] > 0
