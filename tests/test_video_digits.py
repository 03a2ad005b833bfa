"""The video demo's data and judge: real digits moving as prompted (``moving_digits``), read frame by frame by the
digit classifier, and ``evaluate.py`` on text-to-video pipelines."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "distill_scripts"))
sys.path.insert(0, os.path.join(ROOT, "distill_scripts", "digits"))

import moving_digits as md  # noqa: E402


@pytest.fixture(scope="module")
def held_out():
    return md.load_moving_digits("held_out", num_frames=9, seed=0)


def test_clips_move_one_pixel_per_frame_as_prompted(held_out):
    clips, labels, directions, prompts = held_out
    assert clips.shape == (1440, 9, 3, 16, 16) and clips.min() == -1 and clips.max() <= 1
    assert set(directions) == set(md.DIRECTIONS) and len(prompts) == len(clips)
    assert [md.parse_video_prompt(p) for p in prompts[:8]] == list(zip(labels[:8].tolist(), directions[:8]))
    centres = md.digit_centres(clips)
    steps = centres[:, 1:] - centres[:, :-1]  # (N, F-1, 2): exactly one pixel along the prompted axis
    for i in range(0, len(clips), 97):
        d_row, d_col = md.DIRECTION_STEPS[directions[i]]
        assert torch.allclose(steps[i], torch.tensor([[float(d_row), float(d_col)]]).expand_as(steps[i]), atol=1e-4)
    assert md.motion_directions(centres) == directions
    ink = (clips + 1).sum((2, 3, 4))  # the whole digit stays in the frame
    assert torch.allclose(ink, ink[:, :1].expand_as(ink), rtol=1e-5)


def test_centred_clips_fix_the_path_given_the_prompt(held_out):
    """offsets="centre": the same digits and directions as the random-offset clips, every clip on the frame's centre
    line across its motion (pixels 4-11), so a prompt's direction fixes the digit's whole path."""
    clips, labels, directions, prompts = md.load_moving_digits("held_out", num_frames=9, seed=0, offsets="centre")
    assert torch.equal(labels, held_out[1]) and directions == held_out[2] and prompts == held_out[3]
    outside = torch.ones(16, dtype=torch.bool)
    outside[4:12] = False
    for i, direction in enumerate(directions):
        # left/right clips move along the columns, so their rows stay within 4-11; up/down: their columns
        away = clips[i][:, :, outside, :] if md.DIRECTION_STEPS[direction][0] == 0 else clips[i][:, :, :, outside]
        assert (away == -1).all(), (i, direction)
    random_rows = [(held_out[0][i][:, :, outside, :] > -1).any() for i, d in enumerate(directions) if d == "left"]
    assert sum(map(bool, random_rows)) > len(random_rows) / 2  # drawn offsets mostly leave the centre line
    with pytest.raises(ValueError, match="Unknown offsets"):
        md.load_moving_digits("held_out", offsets="middle")


def test_the_classifier_reads_real_clips_frame_by_frame(held_out):
    from digit_classifier import load_classifier

    clips, labels, directions, _ = held_out
    judged = md.judge_clips(load_classifier(), clips[:400].add(1).div(2))
    assert judged["feats"].shape == (400, 9, 64) and judged["directions"] == directions[:400]
    assert (judged["preds"] == labels[:400, None]).float().mean() > 0.95  # 0.978 over all 1440


def test_prompts_and_bad_input():
    prompts = md.video_prompts()
    assert len(prompts) == 40 and prompts[0] == ("a handwritten digit zero moving left", 0, "left")
    assert md.parse_video_prompt("a handwritten digit seven moving up") == (7, "up")
    for bad in ("a handwritten digit seven", "a handwritten digit eleven moving up", "a digit seven moving sideways"):
        with pytest.raises(ValueError, match="Not a moving-digits prompt"):
            md.parse_video_prompt(bad)
    with pytest.raises(ValueError, match="at most 9 frames"):
        md.make_clips(torch.zeros(1, 8, 8).numpy(), ["left"], [0], num_frames=11)
    with pytest.raises(ValueError, match="Unknown split"):
        md.load_moving_digits("test")


def test_score_clips_on_real_and_corrupted_clips(held_out):
    """Real clips score as real; reversing time flips every direction; shuffling frames across clips breaks
    temporal consistency. Each metric moves the way it must."""
    import evaluate
    from digit_classifier import load_classifier

    clips, labels, directions, _ = held_out
    classifier = load_classifier()
    by_prompt = []
    for _, label, moving in md.video_prompts():
        idx = [i for i, (k, d) in enumerate(zip(labels.tolist(), directions)) if k == label and d == moving][:6]
        by_prompt.append(clips[idx].add(1).div(2))
    real_feats = md.judge_clips(classifier, torch.cat(by_prompt))["feats"].flatten(0, 1)
    judged = [md.judge_clips(classifier, c) for c in by_prompt]
    real = evaluate.score_clips(judged, real_feats)
    assert real["direction_accuracy"] == 1.0 and real["temporal_consistency"] > 0.97
    assert real["prompt_accuracy"] > 0.95 and real["digit_fid"] < 1.0

    reversed_ = [md.judge_clips(classifier, c.flip(1)) for c in by_prompt]
    assert evaluate.score_clips(reversed_, real_feats)["direction_accuracy"] == 0.0
    assert evaluate.video_teacher_distances(reversed_, judged)["direction_hist_tv_to_teacher"] == 1.0
    gen = torch.Generator().manual_seed(0)
    mixed = torch.cat(by_prompt)
    perm = torch.randperm(mixed.shape[0] * 9, generator=gen)
    shuffled = mixed.flatten(0, 1)[perm].view_as(mixed)
    scored = evaluate.score_clips([md.judge_clips(classifier, c) for c in shuffled.split(6)], real_feats)
    assert scored["temporal_consistency"] < 0.5 and scored["prompt_accuracy"] < 0.3
    same = evaluate.video_teacher_distances(judged, judged)
    assert same["fid_to_teacher"] < 1e-6 and same["class_hist_tv_to_teacher"] == 0.0


@pytest.fixture(scope="module")
def tiny_video_pipeline(tmp_path_factory):
    from diffusers import CogVideoXPipeline

    from dmdx.pipelines.tiny_components import cogvideox_components

    path = tmp_path_factory.mktemp("video") / "tiny-cogvideox"
    CogVideoXPipeline(**cogvideox_components(sample_size=8, sample_frames=9, num_layers=1)).save_pretrained(path)
    return str(path)


def test_evaluate_video_pipelines_end_to_end(tiny_video_pipeline, tmp_path):
    """evaluate.py on a CogVideoXPipeline folder called as its model card calls it (the transformer's frames and T5
    length); a pipeline scored against itself under another name is at distance 0 (same prompts and seeds)."""
    import evaluate
    from PIL import Image

    out = tmp_path / "eval"
    report = evaluate.main(["--pipeline", f"teacher={tiny_video_pipeline}:3:5.0",
                            "--pipeline", f"copy={tiny_video_pipeline}:3:5.0",
                            "--pipeline", f"student={tiny_video_pipeline}:1:0", "--num_images_per_prompt", "2",
                            "--output_dir", str(out)])
    assert list(report) == ["teacher", "copy", "student"]
    for name, r in report.items():
        assert list(r)[:len(evaluate.VIDEO_METRIC_KEYS)] == list(evaluate.VIDEO_METRIC_KEYS), name
        assert r["num_frames"] == 9 and r["resolution"] == [16, 16] and r["pipeline_class"] == "CogVideoXPipeline"
        assert 0 <= r["prompt_accuracy"] <= 1 and 0 <= r["temporal_consistency"] <= 1
        assert r["num_videos"] == 40 * 2 and r["diversity_raw"] > 0  # two distinct clips per prompt
    assert report["teacher"]["fid_to_teacher"] is None
    assert report["copy"]["fid_to_teacher"] < 1e-6 and report["copy"]["class_hist_tv_to_teacher"] == 0.0
    assert report["copy"]["direction_hist_tv_to_teacher"] == 0.0
    assert report["student"]["nfe"] == 1 and report["teacher"]["nfe"] == 6
    table = (out / "report.md").read_text()
    assert "| student | 1 | 0 | 1 |" in table and "direction acc." in table and "real moving digits" in table
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (10 * 64, 3 * 64)
    assert Image.open(out / "samples.png").size == (10 * 3 * 64, 3 * 64)


def test_evaluate_refuses_mixed_image_and_video(tiny_video_pipeline, capsys):
    import evaluate

    image_teacher = os.path.join(ROOT, "distill_scripts", "digits", "assets", "digits-sd3-teacher")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", f"video={tiny_video_pipeline}:2:0", "--pipeline",
                             f"image={image_teacher}:2:0"])
    assert "Mixed image and video pipelines (video are video)" in capsys.readouterr().err
